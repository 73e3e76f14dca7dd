"""The repository speaks of the product only: no tracked file names who worked on it or a development machine's path.

Two kinds of text are refused in every tracked text file:

* provenance of the work rather than of the product: the people ("engineer", "the lead"), the working sessions
  ("this session", "next session"), the tracker ("the issue", "issue 13", "issue #13"), the reviewers and scratch
  checkouts ("worktree", the removed ``docs/notes`` diary);
* absolute paths of a development or device machine: ``/work/...``, ``/root/...``, ``/home/<user>/...`` and
  ``/tmp/...`` scratch folders (a default built from ``$TMPDIR``, such as the Makefile's ``$(or $(TMPDIR),/tmp)``,
  is not a scratch path and does not match).

``ALLOWED`` lists the few legitimate exceptions by file and exact phrase. Run it alone with
``python -m pytest -q tests/test_repo_hygiene.py``; ``python tests/test_repo_hygiene.py`` prints every finding.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (name, pattern): what a finding is called and the text that makes it one (case-insensitive)
RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "person",
        re.compile(
            r"\bengineers?('s|s')?\b|\bthe lead\b(?!\s+(to|time|of|in)\b)|\blead's\b|\b(reviewer|integrator)s?\b", re.I
        ),
    ),
    (
        "session",
        re.compile(r"\b(this|next|that|earlier|previous|last|later|one|another|each|the|a) session('s|s)?\b", re.I),
    ),
    # a GitHub link to an upstream bug (".../issues/123") is a citation, not the project's tracker
    ("tracker", re.compile(r"\bthe issue('s)?\b|(?<![/\w])issues?[ -]#?\d+\b", re.I)),
    ("checkout", re.compile(r"\bworktrees?\b|\bdocs/notes\b", re.I)),  # scratch checkouts, the removed diary
    ("path", re.compile(r"(?<![\w.$)-])/(work|root)/|(?<![\w.$)-])/home/[a-z_][\w-]*/|(?<![\w.$)-])/tmp/", re.I)),
)

#: path -> phrases that may appear in it (each phrase is matched literally inside the finding's line)
ALLOWED: dict[str, tuple[str, ...]] = {
    "tests/test_repo_hygiene.py": ("",),  # the rules and their own test cases
}

#: tracked files that are not text (checked by content too: a NUL byte in the first 8 kB means binary)
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".pt", ".safetensors", ".gz", ".whl", ".so", ".npz"}


def tracked_files(root: Path = ROOT) -> list[str]:
    """Paths (relative to ``root``) of the files git tracks, or every file below ``root`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, text=True).stdout
        return sorted(p for p in out.split("\0") if p)
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", "outputs", "multirun", "wandb", "build"}
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not skip & set(p.parts))


def findings_in_text(text: str, path: str = "") -> list[tuple[int, str, str]]:
    """``(line number, rule name, line)`` for every line of ``text`` that breaks a rule and is not allowed."""
    allowed = ALLOWED.get(path, ())
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for name, pattern in RULES:
            if pattern.search(line) and not any(phrase in line for phrase in allowed):
                found.append((number, name, line.strip()))
    return found


def findings(root: Path = ROOT) -> list[str]:
    """``path:line: [rule] text`` for every finding in the tracked text files under ``root``."""
    out = []
    for path in tracked_files(root):
        file = root / path
        if Path(path).suffix.lower() in BINARY_SUFFIXES or not file.is_file():
            continue
        data = file.read_bytes()
        if b"\0" in data[:8192]:
            continue
        text = data.decode("utf-8", errors="replace")
        out += [f"{path}:{n}: [{name}] {line[:160]}" for n, name, line in findings_in_text(text, path)]
    return out


def test_no_tracked_file_mentions_the_people_or_machines_behind_it():
    found = findings()
    assert not found, "the repository must speak of the product only:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "Measured by another engineer on the shared machine.",
        "the lead's two background runs were paused",
        "run in this session, commit f1c18ee",
        "from the earlier session",
        "The issue's bar is not met.",
        "Issue 13 asked for a DynaDiag whose soft phase converges",
        "see issue #24",
        "from the detached worktree at 65f0724",
        "see docs/notes/2026-12-01/summary.md",
        "as the reviewer asked",
        "--out /work/bench_quiet",
        "cd /work/wt/lead",
        "wrote /root/out/bench_kernels.json",
        "g++ x.cpp -o /tmp/cpu_isa_probe",
        "data in /home/alice/datasets",
    ],
)
def test_each_rule_catches_what_it_exists_for(line):
    assert findings_in_text(line), line


@pytest.mark.parametrize(
    "line",
    [
        "WHEEL_TMP ?= $(or $(TMPDIR),/tmp)/dynadiag-wheel-test",
        "data.root defaults to /usr/share/datasets/fashion-mnist",
        "Dense GEMMs lead to the best bf16 numbers; this can lead to drift.",
        "a thread issues all its loads",
        "python scripts/make_tables.py multirun/study --out docs/results/study",
        "outputs/<date>/<time>/checkpoints/last.pt",
        "`~/.cache/dynadiag` (DYNADIAG_CACHE overrides)",
        "feature engineering of the inputs",
        "works around https://github.com/pytorch/pytorch/issues/12345",
        "a W&B run in offline mode",
    ],
)
def test_product_text_passes(line):
    assert not findings_in_text(line), findings_in_text(line)


if __name__ == "__main__":
    print("\n".join(findings()) or "clean")
    sys.exit(0)
