"""presence.batch: one tick of a big study's channel messages as one frame, encoded once.

A node that delivers a study in ticks (fanout.py) hands every socket of the study one frame
per tick instead of one per message:

    {"type":"presence.batch","data":{"first_seq":120,"last_seq":161,"events":[...]}}

`events` are the tick's messages in arrival order, less those superseded within the tick (a
message with the same `Outgoing.key` came later: cursor_moved and signals, latest wins).
`first_seq`/`last_seq` are the lowest and highest seq of the tick's presence events, the
left-out ones included, so a client that applied up to first_seq-1 and skips what it already
has ends at last_seq with no gap. The text is assembled from the messages' own JSON texts: nothing
is decoded or encoded again.

A message with `personal` entries (a signal is not sent back to its sender) makes a variant of
the batch for each connection named, as that socket would have seen the tick: its replacements
in place of the originals and its hidden messages gone (so an older message they superseded
comes back), or None when nothing is left for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from presence_svc.codec import Outgoing

BATCH_TYPE = "presence.batch"


@dataclass(frozen=True, slots=True)
class Batch:
    """One tick's frame, what it carries and how many messages it left out."""

    message: Outgoing  # for every socket of the study (`personal` holds the variants)
    carried: Sequence[Outgoing]  # the messages in the main frame, in order
    superseded: int  # messages left out: a later one had the same key


def build_batch(messages: Sequence[Outgoing]) -> Batch:
    """The presence.batch of one tick's `messages` (in arrival order, at least one)."""
    by_key: dict[tuple[str, str], list[int]] = {}
    keyed = 0
    first: int | None = None
    last: int | None = None
    senders: dict[str, list[tuple[int, Outgoing | None]]] = {}
    for index, message in enumerate(messages):
        key, seq, personal = message.key, message.seq, message.personal
        if key is not None:
            by_key.setdefault(key, []).append(index)
            keyed += 1
        if seq is not None:
            if first is None or seq < first:
                first = seq
            if last is None or seq > last:
                last = seq
        if personal is not None:
            for connection_id, replacement in personal.items():
                senders.setdefault(connection_id, []).append((index, replacement))
    if len(by_key) == keyed:
        kept = list(range(len(messages)))  # no key came twice: nothing is superseded
    else:
        kept = [i for i, m in enumerate(messages) if m.key is None or by_key[m.key][-1] == i]
    texts = [messages[i].text for i in kept]
    variants: dict[str, Outgoing | None] = {}
    # Where each kept message sits in the frame (None: everything was kept, in place).
    position = None
    if senders and len(kept) < len(messages):
        position = {index: pos for pos, index in enumerate(kept)}
    for connection_id, own in senders.items():
        variant = _variant(messages, texts, position, by_key, own)
        if variant is not texts:
            variants[connection_id] = _outgoing(first, last, variant) if variant else None
    message = _outgoing(first, last, texts, variants or None)
    return Batch(message, [messages[i] for i in kept], len(messages) - len(kept))


def _variant(
    messages: Sequence[Outgoing],
    texts: list[str],
    position: Mapping[int, int] | None,
    by_key: Mapping[tuple[str, str], list[int]],
    own: list[tuple[int, Outgoing | None]],
) -> list[str]:
    """The event texts of a socket with `own` personal entries (message index, replacement);
    `texts` itself when they are the main frame's."""
    hidden = {index for index, replacement in own if replacement is None}
    replaced = {index: r.text for index, r in own if r is not None}
    # A hidden message that won its key hands the win back to the latest one still shown: the
    # list is made again (rare: two sockets of one user sent the same signal in one tick).
    for index in hidden:
        key = messages[index].key
        if (
            key is not None
            and by_key[key][-1] == index
            and any(i not in hidden for i in by_key[key])
        ):
            return _rebuilt(messages, by_key, hidden, replaced)
    # The usual case: the socket's own messages edited out of the main frame's list.
    if position is None:
        edits = [(index, index) for index, _ in own]
    else:
        edits = [(index, position[index]) for index, _ in own if index in position]
    if not edits:
        return texts  # everything it would change was superseded anyway
    parts = list(texts)
    for index, pos in edits:
        if index in replaced:
            parts[pos] = replaced[index]
    for pos in sorted((pos for index, pos in edits if index in hidden), reverse=True):
        del parts[pos]
    return parts


def _rebuilt(
    messages: Sequence[Outgoing],
    by_key: Mapping[tuple[str, str], list[int]],
    hidden: set[int],
    replaced: Mapping[int, str],
) -> list[str]:
    latest = {
        key: max((i for i in found if i not in hidden), default=-1) for key, found in by_key.items()
    }
    return [
        replaced.get(i, message.text)
        for i, message in enumerate(messages)
        if i not in hidden and (message.key is None or latest[message.key] == i)
    ]


def _outgoing(
    first: int | None,
    last: int | None,
    texts: list[str],
    personal: Mapping[str, Outgoing | None] | None = None,
) -> Outgoing:
    # The frame is built around the events' JSON texts as they are: compact, as json_text's.
    text = (
        f'{{"type":"{BATCH_TYPE}","data":{{"first_seq":{_number(first)},'
        f'"last_seq":{_number(last)},"events":[{",".join(texts)}]}}}}'
    )
    # seq=last_seq: a socket whose snapshot already covers the whole tick drops the frame.
    return Outgoing(seq=last, text=text, personal=personal)


def _number(seq: int | None) -> str:
    return "null" if seq is None else str(seq)
