from pathlib import Path

from scripts.sync_readme import synced

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_tables_match_the_schema() -> None:
    text = README.read_text()
    assert synced(text) == text, "README config tables are stale: run python scripts/sync_readme.py"


def test_readme_names_the_test_command() -> None:
    assert "make test" in README.read_text()
