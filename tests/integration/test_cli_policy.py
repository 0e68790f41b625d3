"""``pciguard policy`` and the guard's client commands, end to end through the CLI."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from conftest import CORPUS, EXAMPLES, as_nobody
from pciguard.cli.main import app
from pciguard.policy.rules import parse_policy

runner = CliRunner()
WORKSTATION = str(EXAMPLES / "workstation.yaml")


def test_generate_allows_what_is_present_and_nothing_plugged_later(tmp_path: Path) -> None:
    result = runner.invoke(app, ["policy", "generate", "-p", WORKSTATION])
    assert result.exit_code == 0, result.output
    policy = parse_policy(result.stdout)
    assert "allow id 8086:15b8 class 02:00:00 via-port 0000:00:1c.0" in result.stdout
    assert "0000:05:00.0" not in result.stdout  # the enclosure is plugged in later
    assert len(policy.rules) == 11
    written = tmp_path / "policy.rules"
    assert runner.invoke(app, ["policy", "generate", "-p", WORKSTATION, "-o", str(written)]).exit_code == 0
    again = runner.invoke(app, ["policy", "generate", "-p", WORKSTATION, "-o", str(written)])
    assert again.exit_code == 2 and "does not overwrite" in again.output
    assert written.read_text() == result.stdout
    nowhere = runner.invoke(
        app, ["policy", "generate", "-p", WORKSTATION, "-o", str(written / "under-a-file.rules")]
    )
    assert nowhere.exit_code == 2 and "cannot write the policy" in nowhere.output


def test_check_accepts_a_good_policy_and_names_the_place_of_a_bad_one() -> None:
    good = CORPUS / "policy" / "good" / "everything.rules"
    assert runner.invoke(app, ["policy", "check", str(good)]).exit_code == 0
    bad = CORPUS / "policy" / "bad" / "short-id.rules"
    result = runner.invoke(app, ["policy", "check", str(bad)])
    assert result.exit_code == 2 and f"{bad}:3:10:" in result.output.replace("\n", "")


def test_test_shows_the_deciding_rule_and_why_the_others_did_not_match(tmp_path: Path) -> None:
    rules = tmp_path / "my.rules"
    rules.write_text("allow id 8086:* if !external\nreject bridge if external\nallow class 01:08:*\n")
    result = runner.invoke(app, ["policy", "test", str(rules), "0000:05:00.0", "-p", WORKSTATION])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("  no  ") and "('id 8086:*' does not match)" in result.output
    assert f"yes {rules}:3: allow class 01:08:*" in result.output
    assert "0000:05:00.0: allow" in result.output
    missing = runner.invoke(app, ["policy", "test", str(rules), "0000:42:00.0", "-p", WORKSTATION])
    assert missing.exit_code == 2 and "not a device of workstation" in missing.output


def test_the_shipped_example_policy_and_unit_are_well_formed() -> None:
    example = runner.invoke(app, ["policy", "example"])
    assert example.exit_code == 0 and len(parse_policy(example.stdout).rules) >= 5
    unit = runner.invoke(app, ["guard", "unit"])
    assert unit.exit_code == 0 and " -m pciguard guard --policy" in unit.stdout


def test_the_guard_refuses_to_start_without_a_policy_it_can_read(tmp_path: Path) -> None:
    result = runner.invoke(app, ["guard", "--policy", str(tmp_path / "none.rules")])
    assert result.exit_code == 2 and "cannot read the policy file" in result.output


def test_client_commands_say_when_no_guard_answers(tmp_path: Path) -> None:
    result = runner.invoke(app, ["guard", "list", "--socket", str(tmp_path / "guard.sock")])
    assert result.exit_code == 5 and "no guard answers" in result.output


def test_the_guard_refuses_ordinary_users(tmp_path: Path) -> None:
    readable = Path(tempfile.mkdtemp(prefix="pciguard-", dir="/tmp"))  # tmp_path is root's alone
    readable.chmod(0o755)
    rules = readable / "policy.rules"
    rules.write_text("allow id 8086:*\n")
    rules.chmod(0o644)

    def start() -> str:
        result = runner.invoke(app, ["guard", "--policy", str(rules), "--state-dir", str(tmp_path / "state")])
        return f"{result.exit_code} {result.output} {result.exception!r}"

    # Imported here first: an ordinary user cannot read the interpreter under /root.
    runner.invoke(app, ["guard", "--policy", str(tmp_path / "none.rules")])
    import pyudev  # noqa: F401

    import pciguard.platforms.linux.guard  # noqa: F401

    answer = as_nobody(start)
    shutil.rmtree(readable)
    assert answer.startswith("5 ") and "cannot start" in answer and "run this as root" in answer, answer


def test_an_unreadable_policy_is_an_input_error_not_a_traceback(tmp_path: Path) -> None:
    runner.invoke(app, ["guard", "--policy", str(tmp_path / "none.rules")])  # imports, as root
    hidden = tmp_path / "policy.rules"  # tmp_path is closed to other users
    hidden.write_text("allow\n")

    def start() -> str:
        result = runner.invoke(app, ["guard", "--policy", str(hidden)])
        return f"{result.exit_code} {result.output}"

    answer = as_nobody(start)
    assert answer.startswith("2 ") and "cannot read the policy file" in answer, answer
