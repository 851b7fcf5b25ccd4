"""The suite's own guard (tests/conftest.py): a skipped test fails the run, so a missing dependency on a fresh
machine cannot hide behind a green CI."""
from pathlib import Path

pytest_plugins = ["pytester"]

GUARD = (Path(__file__).parent / "conftest.py").read_text().split("# ---- no silent skips")[1]


def test_a_skipped_test_fails_the_run(pytester):
    pytester.makeconftest("import pytest\n# ---- no silent skips" + GUARD)
    pytester.makepyfile(test_a="import pytest\n\n@pytest.mark.skipif(True, reason='needs x')\ndef test_x():\n    pass\n\n"
                               "def test_y():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*skipped tests fail the run*", "*test_x: Skipped: needs x*"])


def test_no_skip_passes(pytester):
    pytester.makeconftest("import pytest\n# ---- no silent skips" + GUARD)
    pytester.makepyfile(test_a="def test_y():\n    pass\n")
    assert pytester.runpytest_inprocess("-p", "no:cacheprovider").ret == 0
