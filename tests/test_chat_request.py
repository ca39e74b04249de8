"""The chat-request rules every backend's chat() shares (tuning_magics.chat_request): stop sequences, cut
whole or as the reply arrives, the same on the local engine (tests/test_local_server.py) and on Vertex AI."""

from __future__ import annotations

import pytest

from tuning_magics.errors import UserError


def test_until_stop_holds_back_what_may_start_a_stop_sequence():
    from tuning_magics.chat_request import until_stop

    closed = []

    def source(pieces):
        try:
            yield from pieces
        finally:
            closed.append(True)

    # "Pa" may begin "Paris": held back until "ris." settles it; the source is closed at the stop.
    assert list(until_stop(source(["The cap", "ital is Pa", "ris. Or", " not"]), ["Paris"])) == ["The cap", "ital is "]
    assert closed == [True]
    # Held text that turns out not to start a stop sequence is sent, at the latest at the end.
    assert list(until_stop(iter(["Pa", "nda", " Pa"]), ["Paris", "xyz"])) == ["Panda", " ", "Pa"]
    # The first of several stop sequences in the text wins, found across pieces.
    assert "".join(until_stop(iter("abcdefgh"), ["fg", "cd"])) == "ab"
    assert "".join(until_stop(iter(["abc"]), [])) == "abc"



def test_a_vertex_endpoint_reply_ends_before_a_stop_sequence(vertex):
    pytest.importorskip("google.genai")
    from fake_vertex import TEACHER

    from tuning_magics.backends.vertex import endpoints

    endpoint = endpoints.managed_endpoint(TEACHER)
    whole = endpoint.chat("Hi there")  # "Answer <digest> to: Hi there", a word a streamed piece
    expected = whole[:whole.index(" to:")]
    assert endpoint.chat("Hi there", stop=[" to:", "no such text"]) == expected
    assert "".join(endpoint.chat("Hi there", stop=" to:", stream=True)) == expected
    with pytest.raises(UserError, match="'stop' must be"):
        endpoint.chat("Hi there", stop=["a", "b", "c", "d", "e"])
