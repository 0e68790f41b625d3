"""``pciguard schema``: the JSON Schema of a file format or of the audit report."""

from __future__ import annotations

import json
from enum import StrEnum

import typer
from pydantic import BaseModel

from pciguard.cli.common import out


class Document(StrEnum):
    AUDIT = "audit"  # what `pciguard audit --json` prints
    PLATFORM = "platform"  # platform description files
    SCENARIO = "scenario"  # scenario files


def schema_text(document: Document) -> str:
    from pciguard.formats.platform_file import PlatformFile
    from pciguard.formats.scenario_file import ScenarioFile
    from pciguard.report import AuditReport

    models: dict[Document, type[BaseModel]] = {
        Document.AUDIT: AuditReport,
        Document.PLATFORM: PlatformFile,
        Document.SCENARIO: ScenarioFile,
    }
    return json.dumps(models[document].model_json_schema(), indent=2, sort_keys=True) + "\n"


def command(
    document: Document = typer.Argument(..., help="Which schema to print.", metavar="DOCUMENT"),
) -> None:
    """Print the JSON Schema of the audit report or of a file format."""
    out.print(schema_text(document), end="", soft_wrap=True)
