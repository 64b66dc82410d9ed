"""passes_catalog/ is generated from the code; these tests fail when it is out of date."""

import pytest

from anefx import catalog
from anefx.passes import ALL_PASSES


def test_every_pass_has_an_example_and_a_page():
    for cls in ALL_PASSES:
        assert cls.name in catalog.EXAMPLES, f"{cls.name} has no catalog example"
        assert (catalog.CATALOG_DIR / f"{cls.name}.md").exists()
        doc = cls.__doc__ or ""
        assert "Original" in doc and "Result" in doc and "Options" in doc, f"{cls.name} docstring incomplete"


@pytest.mark.parametrize("cls", ALL_PASSES, ids=lambda c: c.name)
def test_page_is_up_to_date(cls):
    """The before/after graphs are golden files: regenerate with `python -m anefx.catalog`."""
    page = catalog.render_page(cls)
    assert (catalog.CATALOG_DIR / f"{cls.name}.md").read_text() == page
    assert "status: changed" in page, f"{cls.name}'s example does not exercise the pass"
    # the page states a bound, not a measured error (float noise differs between CPUs)
    assert "(relative to the\noutput's scale): < 1e-05." in page


def test_index_explains_how_a_pass_declares_its_sites():
    index = catalog.render_index()
    assert "ctx.site(anchor)" in index and "excluded site" in index


def test_index_is_up_to_date():
    assert (catalog.CATALOG_DIR / "index.md").read_text() == catalog.render_index()
