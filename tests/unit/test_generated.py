"""The committed stubs in generated/ match what the protos produce."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-protos.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    committed = ROOT / "generated" / "stella" / "agent" / "v1"
    fresh = tmp_path / "stella" / "agent" / "v1"

    fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed_files = sorted(
        p.name
        for p in committed.iterdir()
        if p.is_file() and p.suffix in (".py", ".pyi")
    )
    assert committed_files == fresh_files
    _, mismatch, errors = filecmp.cmpfiles(committed, fresh, fresh_files, shallow=False)
    assert mismatch == [], (
        f"regenerate with scripts/generate-protos.sh: {mismatch} differ"
    )
    assert errors == []


def test_every_proto_message_and_field_is_documented():
    undocumented = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_declaration = stripped.startswith(
                ("message ", "enum ", "service ", "rpc ", "oneof ")
            )
            is_field = (
                "=" in stripped
                and stripped.endswith(";")
                and not stripped.startswith(
                    ("syntax", "package", "option", "import", "//")
                )
            )
            if not (is_declaration or is_field):
                continue
            previous = lines[number - 1].strip() if number else ""
            if not previous.startswith("//"):
                undocumented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert undocumented == []
