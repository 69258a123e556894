"""What a rank remembers of its recent steps, and how a pipeline's first stage learns the tokens its last stage sampled.

The engine may send a sequence's next step before its newest token is back,
with PREVIOUS_TOKEN in its place (step.py). In a single stage every rank
sampled that token itself, in the step just before. In a pipeline only the
last stage samples, and the micro-batches take turns, so a sequence's next
step follows its previous one by up to the steps in flight: the last stage
sends each step's tokens to the first stage over a link of their own
("tokens", a TCP connection also on GPUs, since the tokens are on the host
already), and the first stage reads them, in step order, when a step needs
one, so that a micro-batch's next step never waits for the engine.

Each message is (step number, one token per sequence of that step). The first
stage knows which sequences each of its steps had, so it knows each message's
length; it reads every message at the latest `steps` steps later (the engine
keeps at most that many in flight, so the message was sent by then) so that
the link never fills up with messages nobody needed.
"""
from __future__ import annotations

from collections import deque

import torch

from raytp.cluster.comm import Communicator


class RecentSequences:
    """Per request id, from this rank's last `steps` steps: the token sampled for it (for PREVIOUS_TOKEN) and, for a
    penalized one, its tokens so far. A sequence not in any of them is forgotten: no later step can refer to it."""

    def __init__(self, steps: int = 1):
        self.steps = steps
        self.step = 0  # the number of the step running now (steps run so far)
        self.last_step: dict[str, int] = {}  # request id -> the last step that had it
        self.tokens: dict[str, int] = {}  # request id -> the token sampled for it in its last step, once known
        self.histories: dict[str, list[int]] = {}  # penalized request id -> its tokens so far

    def forget_all(self) -> None:
        """A new epoch (the engine replays what was lost) or a throw-away step: nothing earlier is referred to."""
        self.step = 0
        self.last_step, self.tokens, self.histories = {}, {}, {}

    def ran(self, request_ids: list[str], tokens: list[int]) -> None:
        """The step that ran had these sequences and sampled these tokens (none on a stage before the last)."""
        for rid in request_ids:
            self.last_step[rid] = self.step
        self.tokens.update(zip(request_ids, tokens))
        self.step += 1
        oldest = self.step - self.steps  # the oldest step a later one may still refer to
        for rid in [rid for rid, step in self.last_step.items() if step < oldest]:
            del self.last_step[rid]
            self.tokens.pop(rid, None)
            self.histories.pop(rid, None)


class TokensFromLastStage:
    """A pipeline's first stage: the tokens its last stage sampled, step by step, over `link` (its receiving side)."""

    def __init__(self, link: Communicator, recent: RecentSequences):
        self.link, self.recent = link, recent
        self._due: deque[tuple[int, list[str]]] = deque()  # (step number, its request ids) not read yet, oldest first

    def expect(self, request_ids: list[str]) -> None:
        """The step that runs now (recent.step) had these sequences: the last stage will send their tokens."""
        self._due.append((self.recent.step, request_ids))

    def read_for(self, needed: list[str]) -> None:
        """Read the messages this step needs (the tokens of the `needed` requests' last steps) and those at least
        `recent.steps` steps old, in order, into recent.tokens."""
        through = self.recent.step - self.recent.steps
        for rid in needed:
            if rid not in self.recent.last_step:
                raise RuntimeError(f"step protocol: {rid} needs its previous token, but was in none of the last "
                                   f"{self.recent.steps} steps")
            through = max(through, self.recent.last_step[rid])
        while self._due and self._due[0][0] <= through:
            step, request_ids = self._due.popleft()
            message = torch.empty(1 + len(request_ids), dtype=torch.long)  # (1 + sequences,): step, tokens
            self.link.recv(message, src=0)
            if int(message[0]) != step:
                raise RuntimeError(f"tokens link: step {int(message[0])} arrived where step {step} was expected")
            for rid, token in zip(request_ids, message[1:].tolist()):
                if self.recent.last_step.get(rid) == step:  # (a later step of the request's is read later)
                    self.recent.tokens[rid] = token


def send_tokens(link: Communicator, step: int, tokens: list[int]) -> None:
    """A pipeline's last stage: this step's tokens to the first stage."""
    link.send(torch.tensor([step, *tokens], dtype=torch.long), dst=1)
