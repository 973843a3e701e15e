"""The documentation cannot drift from the code: the settings reference is the settings class's
own output, and every link between the pages leads somewhere."""
import re
from pathlib import Path

from serving.common.settings import Settings, reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_settings_reference_is_generated_from_the_settings_class():
    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == reference(), "run: python -m serving.common.settings > docs/settings.md"
    for name in Settings.model_fields:
        assert f"`RNNSERVE_{name.upper()}`" in page


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
