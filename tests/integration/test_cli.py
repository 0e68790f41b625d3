"""The ``pciguard`` command end to end: exit codes, JSON, errors, and every bundled
scenario replaying as it says it will."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, EXAMPLES
from pciguard.cli.main import app
from pciguard.formats.scenario_file import load_scenario
from pciguard.legacy import Flaw
from pciguard.verify.invariants import INVARIANTS

runner = CliRunner(env={"COLUMNS": "200"})
SCENARIOS = sorted((EXAMPLES / "scenarios").glob("*.yaml"))


def test_audit_workstation_reports_groups_and_exits_zero() -> None:
    result = runner.invoke(app, ["audit", "--platform", str(EXAMPLES / "workstation.yaml")])
    assert result.exit_code == 0, result.output
    assert "01:00.0 GPU [10de:1b80]" in result.output and "ready after quarantine" in result.output
    assert "host-critical" in result.output
    verbose = runner.invoke(app, ["audit", "--platform", str(EXAMPLES / "workstation.yaml"), "--verbose"])
    assert "0000:01:00.0 GPU [10de:1b80] (host: nouveau)" in verbose.output


def test_audit_json_follows_the_schema() -> None:
    result = runner.invoke(app, ["audit", "-p", str(EXAMPLES / "server.yaml"), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["schema_version"] == 3
    verdicts = {g["number"]: g["verdict"] for g in report["groups"]}
    pf_group = next(g for g in report["groups"] if any(m["bdf"] == "0000:12:00.0" for m in g["members"]))
    assert pf_group["verdict"] == "not-assignable"
    assert any(r["code"] == "sriov-pf" for r in pf_group["reasons"])
    assert "ready-after-quarantine" in verdicts.values()


@pytest.mark.parametrize("example", ["no-interrupt-remapping", "arm-gicv2m"])
def test_audit_exits_one_when_the_host_cannot_isolate_interrupts(example: str) -> None:
    result = runner.invoke(app, ["audit", "-p", str(EXAMPLES / f"{example}.yaml")])
    assert result.exit_code == 1
    assert "CRITICAL" in result.output


def test_unsafe_override_is_shown_in_the_report() -> None:
    result = runner.invoke(
        app,
        ["audit", "-p", str(EXAMPLES / "no-interrupt-remapping.yaml"), "--allow-unsafe-interrupts", "--json"],
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert any("allow_unsafe_interrupts" in u for u in report["unsafe_overrides"])
    assert any(f["code"] == "unsafe-override" for f in report["findings"])


def test_bad_platform_file_exits_two_with_the_place() -> None:
    bad = CORPUS / "platform" / "bad" / "unknown-key.yaml"
    result = runner.invoke(app, ["audit", "-p", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:7:5: at devices[0].colour: unknown key 'colour'" in " ".join(result.output.split())


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_bundled_scenario_replays_as_it_says(path: Path) -> None:
    result = runner.invoke(app, ["simulate", str(path), "--json"])
    timeline = json.loads(result.stdout)
    assert timeline["as_expected"], result.output
    assert result.exit_code == 0
    expected = load_scenario(path).expect_violations or frozenset()
    assert set(timeline["broken_invariants"]) == expected


def test_every_legacy_flaw_has_a_scenario_that_breaks_an_invariant() -> None:
    from pciguard.legacy import Flaw

    covered = set()
    for path in SCENARIOS:
        scenario = load_scenario(path)
        if scenario.expect_violations:
            covered |= scenario.options.flaws
    assert covered == set(Flaw)


def test_simulate_exits_one_on_an_unexpected_violation(tmp_path: Path) -> None:
    text = (EXAMPLES / "scenarios" / "xsa-302.yaml").read_text()
    text = text.replace("expect_violations:", "old_expect:").replace("old_expect:", "#")
    scenario = tmp_path / "xsa-302-undeclared.yaml"
    scenario.write_text(
        text.replace("platform: ../workstation.yaml", f"platform: {EXAMPLES / 'workstation.yaml'}")
    )
    result = runner.invoke(app, ["simulate", str(scenario)])
    assert result.exit_code == 1
    assert "VIOLATION [no-host-return]" in " ".join(result.output.split())


def test_simulate_exits_three_when_an_expectation_is_not_met(tmp_path: Path) -> None:
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(f"""
platform: {EXAMPLES / "workstation.yaml"}
vms: [{{name: vm1}}]
steps:
  - {{op: make-assignable, device: 0000:03:00.0}}
  - {{op: dma, device: 0000:03:00.0, address: 0x10, expect: landed}}
""")
    result = runner.invoke(app, ["simulate", str(scenario)])
    assert result.exit_code == 3
    assert "NOT AS EXPECTED" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("pciguard ")


@pytest.mark.parametrize("document", ["audit", "platform", "scenario"])
def test_published_schemas_are_current(document: str) -> None:
    published = EXAMPLES.parent / "docs" / "schemas" / f"{document}.schema.json"
    result = runner.invoke(app, ["schema", document])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(published.read_text()), (
        f"regenerate with: pciguard schema {document} > {published.relative_to(EXAMPLES.parent)}"
    )


def test_the_flaw_table_in_the_docs_matches_the_scenarios() -> None:
    import re

    table = (EXAMPLES.parent / "docs" / "invariants.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| .+? \| `([a-z0-9-]+\.yaml)` \| (.+?) \|$", table, re.M)
    assert sorted(flaw for flaw, _, _ in rows) == sorted(f.value for f in Flaw)
    previous: set[str] = set()
    caught_by: dict[str, set[str]] = {name: set() for name in INVARIANTS}
    for flaw, scenario_file, broken in rows:
        scenario = load_scenario(EXAMPLES / "scenarios" / scenario_file)
        assert {f.value for f in scenario.options.flaws} == {flaw}
        claimed = previous if broken == "the same five" else {b.strip() for b in broken.split(",")}
        assert claimed == scenario.expect_violations, flaw
        previous = claimed
        for invariant in claimed:
            caught_by[invariant].add(flaw)
    # The invariants table says which flaws each one catches: the same facts, read the other way.
    listed = re.findall(r"^\| `([a-z-]+)` \| .+ \| ((?:`[a-z0-9-]+`(?:, )?)+|—) \|$", table, re.M)
    assert {name: set(re.findall(r"`([a-z0-9-]+)`", flaws)) for name, flaws in listed} == caught_by


def test_verify_writes_a_counterexample_that_simulate_replays(tmp_path: Path) -> None:
    out = tmp_path / "trace.yaml"
    legacy = EXAMPLES / "verify" / "legacy" / "xsa-442.yaml"
    result = runner.invoke(app, ["verify", str(legacy), "--out", str(out)])
    assert result.exit_code == 0, result.output  # the flaw it declares was caught
    assert "VIOLATION after" in result.output and out.exists()
    replayed = runner.invoke(app, ["simulate", str(out), "--json"])
    assert replayed.exit_code == 0 and json.loads(replayed.stdout)["as_expected"]
    discarded = runner.invoke(app, ["verify", str(legacy), "--out", "/dev/null"])
    assert discarded.exit_code == 0, discarded.output  # the trace is replayed as written, not read back
    assert "-> as expected" in result.output and "-> as expected" in discarded.output


def test_verify_json_and_exit_codes(tmp_path: Path) -> None:
    secure = EXAMPLES / "verify" / "ref-symmetric.yaml"
    result = runner.invoke(app, ["verify", str(secure), "--json"])
    assert result.exit_code == 0
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "pass" and verdict["states"] > 100 and verdict["counterexample"] is None
    limited = runner.invoke(app, ["verify", str(secure), "--max-states", "5"])
    assert limited.exit_code == 4 and "INCOMPLETE" in limited.output
    undeclared = tmp_path / "undeclared.yaml"
    text = (EXAMPLES / "verify" / "legacy" / "xsa-302.yaml").read_text()
    undeclared.write_text(
        text.replace("platform: ../../", f"platform: {EXAMPLES}/").split("expect_violations")[0]
    )
    found = runner.invoke(app, ["verify", str(undeclared), "--out", str(tmp_path / "t.yaml")])
    assert found.exit_code == 1


def test_verify_names_the_reductions_in_force_and_each_can_be_left_out() -> None:
    secure = str(EXAMPLES / "verify" / "ref-teardown-race.yaml")
    every = runner.invoke(app, ["verify", secure, "--workers", "1"])
    assert every.exit_code == 0
    assert "reductions: symmetry, independence, messages, budget" in " ".join(every.stdout.split())
    without = runner.invoke(app, ["verify", secure, "--workers", "1", "--no-budget", "--json"])
    assert without.exit_code == 0
    counted = json.loads(runner.invoke(app, ["verify", secure, "--workers", "1", "--json"]).stdout)
    assert json.loads(without.stdout)["states"] > counted["states"]  # the scenario has a fault to spare
    none = runner.invoke(
        app,
        [
            "verify",
            secure,
            "--workers",
            "1",
            "--no-symmetry",
            "--no-independence",
            "--no-messages",
            "--no-budget",
        ],
    )
    assert none.exit_code == 0 and "reductions: none" in none.stdout


def test_verify_with_workers_says_so_and_finds_the_same_states() -> None:
    secure = str(EXAMPLES / "verify" / "ref-symmetric.yaml")
    alone = json.loads(runner.invoke(app, ["verify", secure, "--json"]).stdout)
    split = runner.invoke(app, ["verify", secure, "--json", "--workers", "2"])
    assert split.exit_code == 0, split.output
    figures = json.loads(split.stdout)
    assert (figures["workers"], alone["workers"]) == (2, 1)
    assert (figures["verdict"], figures["states"], figures["transitions"]) == (
        alone["verdict"],
        alone["states"],
        alone["transitions"],
    )
    shown = runner.invoke(app, ["verify", secure, "--workers", "2"])
    assert "; 2 workers" in shown.output and "PASS" in shown.output
    for wrong in ("0", "65", "many"):
        refused = runner.invoke(app, ["verify", secure, "--workers", wrong])
        assert refused.exit_code == 2 and "neither 'auto' nor a number" in refused.output, wrong


def test_verify_by_default_hands_a_search_to_one_worker_per_core_once_it_has_run_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pciguard.cli.verify as verify_command

    secure = str(EXAMPLES / "verify" / "ref-teardown-race.yaml")
    alone = json.loads(runner.invoke(app, ["verify", secure, "--json", "--workers", "1"]).stdout)
    monkeypatch.setattr(verify_command.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(verify_command, "HAND_OVER_AFTER", 60.0)  # however slow the machine
    quick = json.loads(runner.invoke(app, ["verify", secure, "--json"]).stdout)
    assert quick["workers"] == 1  # done before the handover: no worker was started
    monkeypatch.setattr(verify_command, "HAND_OVER_AFTER", 0.0)
    handed = json.loads(runner.invoke(app, ["verify", secure, "--json"]).stdout)
    assert handed["workers"] == 2
    assert [handed[k] for k in ("verdict", "states", "transitions")] == [
        alone[k] for k in ("verdict", "states", "transitions")
    ]
    monkeypatch.setattr(verify_command.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    many_cores = json.loads(runner.invoke(app, ["verify", secure, "--json"]).stdout)
    assert many_cores["workers"] == verify_command.AUTO_WORKERS == 4
    assert many_cores["states"] == alone["states"]
    monkeypatch.setattr(verify_command.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    one_core = json.loads(runner.invoke(app, ["verify", secure, "--json"]).stdout)
    assert one_core["workers"] == 1


def test_verify_explores_several_scenarios_in_turn_with_one_verdict_each(tmp_path: Path) -> None:
    secure, legacy = (
        EXAMPLES / "verify" / "ref-symmetric.yaml",
        EXAMPLES / "verify" / "legacy" / "xsa-442.yaml",
    )
    alone = json.loads(runner.invoke(app, ["verify", str(secure), "--json"]).stdout)
    in_turn = ["--out", str(tmp_path), "--workers", "1"]
    both = runner.invoke(app, ["verify", str(secure), str(legacy), "--json", *in_turn])
    assert both.exit_code == 0, both.output  # a pass, and the violation xsa-442 declares
    first, second = json.loads(both.stdout)
    assert (first["scenario"], first["verdict"], first["states"]) == (str(secure), "pass", alone["states"])
    assert second["verdict"] == "violation"
    assert second["counterexample"]["file"] == str(tmp_path / "xsa-442-counterexample.yaml")
    assert (tmp_path / "xsa-442-counterexample.yaml").exists()
    shown = runner.invoke(app, ["verify", str(secure), str(legacy), *in_turn])
    assert f"{secure}:" in shown.output and "2 scenarios: 1 pass, 1 violation" in shown.output
    # One exit code: a search a limit stopped, unless a violation nobody expected was found.
    undeclared = tmp_path / "undeclared.yaml"
    undeclared.write_text(
        legacy.read_text().replace("platform: ../../", f"platform: {EXAMPLES}/").split("expect_violations")[0]
    )
    mixed = runner.invoke(
        app, ["verify", str(secure), str(undeclared), "--max-states", "5", "--out", str(tmp_path)]
    )
    assert mixed.exit_code == 4 and "2 scenarios: 2 incomplete" in mixed.output
    worst = runner.invoke(
        app, ["verify", str(undeclared), str(secure), "--max-states", "5000", "--out", str(tmp_path)]
    )
    assert worst.exit_code == 1, worst.output


def test_verify_with_workers_explores_several_scenarios_at_once_with_the_same_verdicts(
    tmp_path: Path,
) -> None:
    paths = [
        str(EXAMPLES / "verify" / "ref-teardown-race.yaml"),
        str(EXAMPLES / "verify" / "legacy" / "xsa-442.yaml"),
        str(EXAMPLES / "verify" / "ref-symmetric.yaml"),
    ]
    in_turn = runner.invoke(app, ["verify", *paths, "--json", "--out", str(tmp_path), "--workers", "1"])
    (tmp_path / "xsa-442-counterexample.yaml").unlink()
    at_once = runner.invoke(app, ["verify", *paths, "--json", "--out", str(tmp_path), "--workers", "2"])
    assert at_once.exit_code == in_turn.exit_code == 0, at_once.output

    def figures(report: dict[str, object]) -> tuple[object, ...]:
        return report["scenario"], report["verdict"], report["states"], report["transitions"]

    reports = json.loads(at_once.stdout)
    assert [figures(r) for r in reports] == [figures(r) for r in json.loads(in_turn.stdout)]
    assert [r["workers"] for r in reports] == [1, 1, 1]  # one process each
    assert reports[1]["counterexample"]["file"] == str(tmp_path / "xsa-442-counterexample.yaml")
    assert (tmp_path / "xsa-442-counterexample.yaml").exists()
    shown = runner.invoke(app, ["verify", *paths, "--out", str(tmp_path), "--workers", "2"])
    assert [shown.output.index(f"{p}:") for p in paths] == sorted(shown.output.index(f"{p}:") for p in paths)
    assert "3 scenarios: 2 pass, 1 violation" in shown.output


def test_verify_reads_every_scenario_before_exploring_any(tmp_path: Path) -> None:
    secure = EXAMPLES / "verify" / "ref-symmetric.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    result = runner.invoke(app, ["verify", str(secure), str(broken), "--json"])
    assert result.exit_code == 2 and "broken.yaml" in result.output and '"verdict"' not in result.output
    one_file = runner.invoke(app, ["verify", str(secure), str(secure), "--out", str(tmp_path / "t.yaml")])
    assert one_file.exit_code == 2 and "not a directory" in one_file.output


def test_verify_needs_an_explore_section() -> None:
    result = runner.invoke(app, ["verify", str(EXAMPLES / "scenarios" / "xsa-302.yaml")])
    assert result.exit_code == 2 and "no 'explore' section" in result.output


def _commands(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    if hasattr(group, "commands"):  # a group (typer's own click or the real one)
        for name, sub in group.commands.items():
            found += _commands(sub, (*prefix, name))
    return found


def test_every_help_is_plain_text_with_the_exit_codes() -> None:
    import typer.main

    for command in _commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        text = result.output
        assert "Exit codes" in text and "70 " in text, command
        assert "<bool>" not in text and "🚌" not in text, (command, text)
        assert not any(ord(c) > 0x2000 and c not in "─│" for c in text), (command, text)


def test_an_address_in_help_is_not_an_emoji() -> None:
    result = runner.invoke(app, ["quarantine", "--help"])
    assert "DOMAIN:BUS:DEVICE.FUNCTION" in result.output


def test_an_internal_error_is_one_line_and_exit_70(tmp_path: Path) -> None:
    import subprocess
    import sys

    program = (
        "import pciguard.cli.main as m\ndef broken(): raise KeyError('a bug')\nm.app = broken\nm.main()\n"
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert run.returncode == 70
    assert "Traceback" not in run.stderr and "internal error: KeyError" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_bad_address_is_exit_2_not_a_traceback() -> None:
    result = runner.invoke(app, ["quarantine", "00:03", "--dry-run"])
    assert result.exit_code == 2 and "is not a PCI address" in result.output


def test_policy_generate_makes_the_folder_it_writes_into(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "pciguard" / "policy.rules"
    result = runner.invoke(
        app, ["policy", "generate", "-p", str(EXAMPLES / "workstation.yaml"), "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    assert target.read_text().count("allow") > 0


def test_the_unit_runs_this_interpreter() -> None:
    import sys

    result = runner.invoke(app, ["guard", "unit"])
    assert f"ExecStart={sys.executable} -m pciguard guard" in result.output
    assert "/usr/bin/env" not in result.output and "ProtectHome=read-only" in result.output


def test_simulate_says_what_destroy_did() -> None:
    result = runner.invoke(app, ["simulate", str(EXAMPLES / "scenarios" / "xsa-302.yaml")])
    assert "destroy vm1  OK  destroyed vm1; ledger: 0000:03:00.0 quarantined" in result.output
    assert "destroy_domain(" not in result.output


def test_bracketed_names_print_as_written(tmp_path: Path) -> None:
    """Regression: names were read as Rich markup, so pci.ids' "... Port [ext gfx]" lost
    its bracketed text, and "[/]" raised MarkupError."""
    platform = tmp_path / "brackets.yaml"
    platform.write_text(
        "name: brackets\niommus: [{name: dmar0, scope: all}]\ndevices:\n"
        "  - {bdf: 0000:00:01.0, kind: rc-endpoint, name: 'PCIe Port [ext gfx] [/] :bus:'}\n"
    )
    result = runner.invoke(app, ["audit", "-p", str(platform)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "PCIe Port [ext gfx] [/] :bus:" in result.output
