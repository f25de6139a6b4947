"""The mode rules live in serving/modes.py; every mode is covered and inference matches the CLI's."""

from serving.config import MODES
from serving.modes import infer_mode, uses_adapter, uses_retrieval


def test_each_mode_retrieves_and_adapts_as_its_name_says():
    table = {mode: (uses_retrieval(mode), uses_adapter(mode)) for mode in MODES}
    assert table == {"base": (False, False), "rag": (True, False), "ft": (False, True), "rag+ft": (True, True)}
    assert not uses_retrieval("RAG") and not uses_adapter("bogus")


def test_infer_mode_from_what_a_request_names():
    assert [infer_mode(c, a) for c, a in ((None, None), ("docs", None), (None, "lora"), ("docs", "lora"))] == [
        "base", "rag", "ft", "rag+ft"]
