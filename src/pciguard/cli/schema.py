"""``pciguard schema``: the JSON Schema of a file format or of the audit report."""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import typer

from pciguard.cli.common import out


class Document(StrEnum):
    AUDIT = "audit"  # what `pciguard audit --json` prints
    PLATFORM = "platform"  # platform description files
    SCENARIO = "scenario"  # scenario files


def schema_text(document: Document) -> str:
    from pciguard.formats.platform_file import PlatformFile
    from pciguard.formats.scenario_file import ScenarioFile
    from pciguard.report import report_schema

    schemas: dict[Document, Callable[[], dict[str, Any]]] = {
        Document.AUDIT: report_schema,
        Document.PLATFORM: PlatformFile.model_json_schema,
        Document.SCENARIO: ScenarioFile.model_json_schema,
    }
    return json.dumps(schemas[document](), indent=2, sort_keys=True) + "\n"


def command(
    document: Document = typer.Argument(..., help="Which schema to print.", metavar="DOCUMENT"),
) -> None:
    """Print the JSON Schema of the audit report or of a file format."""
    out.print(schema_text(document), end="", soft_wrap=True)
