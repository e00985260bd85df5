"""Some explanations are kept in one place and the code points there: the policy precedence
lives in docs/datapath.md, and the C lookup, its Python twin and the resolver say so instead of
carrying copies that could drift."""

from __future__ import annotations

import re

from tests.conftest import REPO

SECTION = "### Precedence: the lookup and how entries combine"
POINTING_HERE = ("dataplane/bpf/lib/policy.h", "dataplane/mapstate.py", "dataplane/policy/resolver.py")


def test_the_precedence_is_explained_in_docs_datapath() -> None:
    text = (REPO / "docs" / "datapath.md").read_text()
    assert text.count(SECTION) == 1
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    for needed in ("(identity, protocol, port)", "(ANY identity, ANY protocol)", "DENY (3)", "REDIRECT (2)",
                   "ALLOW (1)", "normalize_entries", "Attribution"):
        assert needed in section


def test_the_code_points_to_it_instead_of_repeating_it() -> None:
    for path in POINTING_HERE:
        text = (REPO / path).read_text()
        assert 'docs/datapath.md ("Precedence")' in text, path
        # a copy of the explanation would list the lookups or the verdict values again
        assert not re.search(r"\(ANY identity, ANY proto", text, re.IGNORECASE), path
        assert not re.search(r"DENY \(3\)|DENY\s+an ingressDeny", text), path
    assert "(datapath.md#precedence-the-lookup-and-how-entries-combine)" in (REPO / "docs" / "policy.md").read_text()
