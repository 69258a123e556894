"""What a rank remembers between steps, and the tokens a pipeline's last stage sends its first stage, over a real
TCP stage link: each step reads exactly the messages it needs (and the old ones), in order."""
import pytest

from raytp.cluster.step_memory import RecentSequences, TokensFromLastStage, send_tokens
from tests.helpers import socket_link_pair

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def link_pair():
    sender, receiver = socket_link_pair()
    yield sender, receiver
    sender.close()
    receiver.close()


def test_a_sequence_is_forgotten_once_no_later_step_can_refer_to_it():
    recent = RecentSequences(steps=2)
    recent.ran(["a", "b"], [5, 6])
    recent.histories["a"] = [1, 2, 5]
    recent.ran(["c"], [7])
    assert recent.tokens == {"a": 5, "b": 6, "c": 7}
    recent.ran(["c"], [8])  # step 2: step 0 is two steps back, and a, b were in no step since
    assert recent.tokens == {"c": 8} and recent.histories == {}
    recent.forget_all()
    assert recent.tokens == {} and recent.step == 0


def test_the_first_stage_reads_the_tokens_each_step_needs_in_order(link_pair):
    sender, receiver = link_pair
    first = RecentSequences(steps=4)
    tokens_in = TokensFromLastStage(receiver, first)
    # Steps 0 and 1 (two micro-batches) ran on the first stage; the last stage sampled their tokens.
    for rids in (["a", "b"], ["c", "d"]):
        tokens_in.read_for([])  # nothing needed yet, nothing old enough to read
        tokens_in.expect(rids)
        first.ran(rids, [])
    assert first.tokens == {}
    send_tokens(sender, 0, [10, 11])
    send_tokens(sender, 1, [12, 13])
    # Step 2 continues a and b with PREVIOUS_TOKEN: it reads step 0's message, not step 1's.
    tokens_in.read_for(["a", "b"])
    assert first.tokens == {"a": 10, "b": 11}
    tokens_in.expect(["a", "b"])
    first.ran(["a", "b"], [])
    tokens_in.read_for(["c"])  # step 3 needs c: step 1's message
    assert first.tokens == {"a": 10, "b": 11, "c": 12, "d": 13}
    tokens_in.expect(["c"])
    first.ran(["c"], [])
    send_tokens(sender, 2, [20, 21])
    tokens_in.read_for(["a"])  # step 4: a's last step was 2
    assert first.tokens == {"a": 20, "b": 21, "c": 12, "d": 13}


def test_messages_nobody_needed_are_read_once_old_enough(link_pair):
    """The engine keeps at most `steps` steps in flight: a message that old was sent, and is read even unneeded, so
    that the link never fills up."""
    sender, receiver = link_pair
    first = RecentSequences(steps=2)
    tokens_in = TokensFromLastStage(receiver, first)
    for step, rid in enumerate(["a", "b"]):
        tokens_in.read_for([])
        tokens_in.expect([rid])
        first.ran([rid], [])
    send_tokens(sender, 0, [10])
    tokens_in.read_for([])  # step 2: step 0 is two steps back
    assert first.tokens == {"a": 10}

def test_a_message_of_another_step_is_an_error_not_a_desync(link_pair):
    sender, receiver = link_pair
    first = RecentSequences(steps=2)
    tokens_in = TokensFromLastStage(receiver, first)
    tokens_in.expect(["a"])
    first.ran(["a"], [])
    send_tokens(sender, 5, [1])
    with pytest.raises(RuntimeError, match="step 5 arrived where step 0 was expected"):
        tokens_in.read_for(["a"])


def test_a_token_never_sent_for_is_a_protocol_error(link_pair):
    _, receiver = link_pair
    tokens_in = TokensFromLastStage(receiver, RecentSequences(steps=2))
    with pytest.raises(RuntimeError, match="x needs its previous token"):
        tokens_in.read_for(["x"])
