"""Write `.env.example` and the README's settings table from `app.settings.Settings`.

python scripts/settings_docs.py          # rewrite both
python scripts/settings_docs.py --check  # exit 1 if either is out of date (tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.settings import Settings, field_default_text  # noqa: E402

ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


ENV_EXAMPLE_HEAD = """\
# Every setting the image reads, with the app's default, each line commented out: copied to .env
# (`cp .env.example .env`), this file changes nothing, so the image's own defaults (the ENV block of
# its Dockerfile: HF_HOME, the model card's engine settings, ENGINE=trtllm in the -trtllm image)
# stand. To set one, remove the `#` in front of its name and give it a value. Uncomment nothing you
# leave empty: `HF_HOME=` still sets the variable, to "", over the image's default (the app reads ""
# as unset, libraries such as huggingface_hub do not). Generated from app/settings.py by
# scripts/settings_docs.py.
"""


def env_example() -> str:
    """Every setting as `#NAME=default` (no space: uncommenting removes one character, and a
    description that starts with `NAME=...` is never read as a setting), under `# description`."""
    lines = [ENV_EXAMPLE_HEAD]
    for name, field in Settings.model_fields.items():
        lines.append(f"# {field.description}")
        lines.append(f"#{name}={field_default_text(name)}")
        lines.append("")
    return "\n".join(lines)


def readme_table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field_default_text(name)
        rows.append(f"| `{name}` | {f'`{default}`' if default else '(unset)'} | {field.description} |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    head, sep, rest = readme.partition(BEGIN)
    if not sep:
        raise SystemExit(f"README.md has no {BEGIN} marker")
    _, sep2, tail = rest.partition(END)
    if not sep2:
        raise SystemExit(f"README.md has no {END} marker")
    return f"{head}{BEGIN}\n{readme_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    want = {ENV_EXAMPLE: env_example(), README: with_table(README.read_text())}
    stale = [p.name for p, text in want.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for name in stale:
            print(f"{name} is out of date: run python scripts/settings_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in want.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
