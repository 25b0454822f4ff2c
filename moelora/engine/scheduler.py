"""Continuous batching over the paged KV cache: which sequences run this step, and with how many tokens.

Each step every running sequence that has decoded decodes one token; then the running sequences whose
prompt is not all computed yet (chunked prefill) take the next part of it, oldest first, and waiting
sequences (new, or preempted) are admitted for prefill in arrival order while there are free sequence
slots, token budget and KV blocks. With chunked prefill no step runs more tokens than the budget: a prompt
that does not fit it is computed over several steps (its blocks are all taken when it is admitted); without
it a prompt runs whole, alone in its step if it must. When a running sequence needs a block and none is
free, the most recently arrived running sequence is preempted: its blocks are freed and it waits to be
recomputed from its prompt and the tokens it already generated, so no request is lost and none sees
another's cache.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

from moelora.cache.kv_cache import BlockAllocator, BlockKey, blocks_for
from moelora.cache.state_cache import SlotAllocator
from moelora.engine.request import Sequence, Status


@dataclass(frozen=True)
class ScheduledStep:
    """The sequences of one step, in batch order, and how many tokens each runs (from num_cached on:
    fewer than it has left where its prompt is computed in parts)."""

    seqs: list[Sequence]
    num_new: list[int]
    preempted: list[Sequence]
    # Linear-attention states: (snapshot slot, sequence's slot) copies to make before the step (a cached
    # prefix's states for the sequence that starts after it), and the sequences whose state to copy into
    # their newest `snapshots` slot after it (this step ends at one of their boundaries: `_edges`)
    restores: list[tuple[int, int]] = field(default_factory=list)
    snapshots: list[Sequence] = field(default_factory=list)


# A waiting sequence whose adapter does not fit the batch lets later ones pass at most this many times;
# after that nothing behind it is admitted until it is, so no adapter starves while others keep arriving.
MAX_SKIPS = 4


def snapshot_slots(state_slots: bool, prefix_caching: bool, chunked_prefill: bool, wanted: int) -> int:
    """The state snapshot slots a scheduler keeps: `wanted` for a model with linear-attention states and
    prefix caching, if its prompts are computed in parts (a part must end where the states are kept);
    none otherwise (and then no prefix caching for such a model)."""
    return wanted if state_slots and prefix_caching and chunked_prefill else 0


def _adapter_order(seq: Sequence) -> int:
    entry = seq.request.lora_entry
    return 0 if entry is None else entry.uid


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        adapters_fit: Callable[[Set[Any]], bool] = lambda adapters: True,
        prefix_caching: bool = False,
        state_slots: bool = False,
        chunked_prefill: bool = False,
        long_prefill_token_threshold: int = 0,
        state_snapshots: int = 0,
    ) -> None:
        """`state_slots`: the model has linear-attention layers, so every running sequence holds a state
        slot (max_num_seqs of them, slots 0..max_num_seqs-1); a prompt computed in parts continues its
        slot's state. A cached prefix is only of use to such a model with the layers' states at its end:
        with prefix caching and chunked prefill, `state_snapshots` slots (numbered from max_num_seqs on)
        keep the states of that many prefixes, each taken where a sequence's computation reaches one of
        its boundaries (`_edges`; a part ends there), kept once that block is in the prefix cache, dropped
        least recently used first; a sequence starts only after a cached prefix whose last block has one
        (0 snapshots: prefix caching off for such models). `long_prefill_token_threshold`: with chunked
        prefill, the most tokens of one prompt in a step (0: no cap but the budget)."""
        self.allocator, self.block_size = allocator, block_size
        snapshots = snapshot_slots(state_slots, prefix_caching, chunked_prefill, state_snapshots)
        self.prefix_caching = prefix_caching and (not state_slots or snapshots > 0)
        # committed snapshots by the key of the block their prefix ends with, least recently used first
        self.snapshots: OrderedDict[BlockKey, int] = OrderedDict()
        self._free_snapshots = list(range(max_num_seqs, max_num_seqs + snapshots))
        self._pending: set[BlockKey] = set()  # known keys of snapshots taken, not yet kept
        self.chunked_prefill = chunked_prefill
        self.part_cap = (
            long_prefill_token_threshold if chunked_prefill and long_prefill_token_threshold else None
        )
        self.states = SlotAllocator(max_num_seqs) if state_slots else None
        self.adapters_fit = adapters_fit
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        preempted = self._grow_running()
        # Decoding sequences first (one token each), then the rest of the prompts begun in earlier steps,
        # oldest first (running is in arrival order), then new ones while budget is left.
        budget = self.max_num_batched_tokens
        num_new: dict[int, int] = {}
        for seq in self.running:
            if seq.num_tokens - seq.num_cached == 1:
                num_new[id(seq)] = 1
                budget -= 1
        for seq in self.running:
            left = seq.num_tokens - seq.num_cached
            if left > 1:
                n = self._part(seq, left, budget)
                if n > 0:
                    num_new[id(seq)] = n
                    budget -= n
        restores: list[tuple[int, int]] = []
        if not preempted:
            for seq, n in self._admit_waiting(budget, restores):
                num_new[id(seq)] = n
        # The batch grouped by adapter (base first), arrival order within a group: the LoRA kernels make
        # one pass per distinct adapter of a block of tokens, so a block of one adapter costs one pass.
        # A sequence whose prompt's next part found no budget sits this step out.
        seqs = sorted((s for s in self.running if id(s) in num_new), key=_adapter_order)
        num = [num_new[id(s)] for s in seqs]
        snapshots = [s for s, n in zip(seqs, num, strict=True) if self._plan_snapshot(s, n)]
        return ScheduledStep(seqs, num, preempted, restores, snapshots)

    def _part(self, seq: Sequence, left: int, budget: int) -> int:
        """The tokens of `seq`, `left` to compute, that run this step, `budget` left of the step's: all of
        them without chunked prefill, else at most the budget and the part cap, and with state snapshots
        not past its next boundary (`_edges`: a part ends there, so the states there can be kept)."""
        if not self.chunked_prefill:
            return left
        n = min(left, max(budget, 0), self.part_cap or left)
        for edge in self._edges(seq):
            if seq.num_cached < edge < seq.num_cached + n:
                return edge - seq.num_cached
        return n

    def _edges(self, seq: Sequence) -> list[int]:
        """With state snapshots, where seq's linear-attention states are worth keeping, in order: where its
        prefix leaves the cached blocks that have no states kept (the next prompt sharing that prefix, a
        common system prompt, starts there), and the end of its last full block that a later prompt could
        start after (one token left: the next turn of a chat)."""
        if self.states is None or not self.prefix_caching:
            return []
        last = (len(seq.token_ids) - 1) // self.block_size * self.block_size
        return sorted({e for e in (seq.divergence[0] if seq.divergence else 0, last) if e > 0})

    def _plan_snapshot(self, seq: Sequence, n: int) -> bool:
        """Whether seq's `n` tokens this step end at one of its boundaries and a snapshot slot is set
        aside for its states there (a free one, else the least recently used one's)."""
        end = seq.num_cached + n
        # every boundary lies before the last token, so a decode step (the common case) never ends at one
        if end >= len(seq.token_ids) or end not in self._edges(seq):
            return False
        # At the divergence the blocks are the cache's, not this sequence's own: their key is known, and
        # one snapshot of it is enough (prompts sharing a prefix that arrive together all reach it)
        key = seq.divergence[1] if seq.divergence and seq.divergence[0] == end else None
        if key is not None and (key in self.snapshots or key in self._pending):
            return False
        if self._free_snapshots:
            slot = self._free_snapshots.pop()
        elif self.snapshots:
            slot = self.snapshots.popitem(last=False)[1]
        else:
            return False  # every snapshot slot waits for its block to be cached
        seq.snapshots.append((end // self.block_size - 1, slot, key))
        if key is not None:
            self._pending.add(key)
        return True

    def drop_snapshot(self, seq: Sequence) -> None:
        """Give back seq's snapshot slots that are not kept (it stopped, or the step did not run it)."""
        for _, slot, key in seq.snapshots:
            self._free_snapshots.append(slot)
            self._pending.discard(key)
        seq.snapshots = []

    def _grow_running(self) -> list[Sequence]:
        """Give every running sequence room for one more token, preempting the newest when blocks run out."""
        preempted: list[Sequence] = []
        self.running.sort(key=lambda s: (s.request.arrival, s.index))
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = blocks_for(seq.num_tokens, self.block_size) - len(seq.blocks)
            while need > self.allocator.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                if need > 0:
                    seq.blocks += self.allocator.allocate(need)
                i += 1
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        self._give_back_state(seq)
        self.drop_snapshot(seq)
        seq.blocks, seq.num_cached, seq.num_registered, seq.status = [], 0, 0, Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Back to the head of the queue, oldest first, so it resumes before newer requests start.
        self.waiting.appendleft(seq)
        ordered = sorted(self.waiting, key=lambda s: (s.request.arrival, s.index))
        self.waiting = deque(ordered)

    def _admit_waiting(self, budget: int, restores: list[tuple[int, int]]) -> list[tuple[Sequence, int]]:
        """Admit in arrival order while sequences, tokens (`budget` left of the step's) and blocks allow; at
        most S adapters per batch. -> each admitted sequence and the tokens it runs this step (with
        chunked prefill as many of its prompt as the budget leaves); a sequence that starts after a cached
        prefix with linear-attention states adds (snapshot slot, its slot) to `restores`."""
        admitted: list[tuple[Sequence, int]] = []
        adapters = {s.request.lora_entry for s in self.running if s.request.lora_entry is not None}
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            entry = seq.request.lora_entry
            if entry is not None and entry not in adapters and not self.adapters_fit(adapters | {entry}):
                seq.skips += 1
                if seq.skips > MAX_SKIPS:
                    break
                continue
            tokens = seq.num_tokens
            cached, snapshot = self._claim_prefix(seq)
            compute = tokens - len(cached) * self.block_size
            need = blocks_for(tokens, self.block_size) - len(cached)
            # No budget left; without chunked prefill, not enough for the whole prompt unless it runs alone.
            over = budget <= 0 if self.chunked_prefill else compute > budget and bool(self.running)
            if need > self.allocator.num_free or over:
                self.allocator.free(cached)
                break
            self.waiting.remove(seq)
            self.start_running(seq)
            if snapshot is not None:
                self.snapshots.move_to_end(snapshot)
                restores.append((self.snapshots[snapshot], seq.state_slot))
            seq.blocks = cached + self.allocator.allocate(need)
            seq.num_cached, seq.num_registered = len(cached) * self.block_size, len(cached)
            seq.skips = 0
            n = self._part(seq, compute, budget)
            admitted.append((seq, n))
            budget -= n
            if entry is not None:
                adapters.add(entry)
        return admitted

    def _key(self, seq: Sequence, j: int, parent: int) -> BlockKey:
        """The prefix-cache key of block j of `seq`, whose block j-1 is `parent` (-1 for j = 0)."""
        bs, entry = self.block_size, seq.request.lora_entry
        generation = self.allocator.generation[parent] if parent >= 0 else 0
        return parent, generation, tuple(seq.token_ids[j * bs : (j + 1) * bs]), entry.uid if entry else 0

    def _claim_prefix(self, seq: Sequence) -> tuple[list[int], BlockKey | None]:
        """The cached blocks of seq's longest cached prefix, held for it; at least one token is left to
        compute (its logits are needed). Nothing for a sequence that wants prompt log-probs (it needs the
        logits of every prompt position). With linear-attention states, the longest such prefix whose
        last block has a snapshot, and that block's key (None: no prefix)."""
        seq.divergence = None
        if not self.prefix_caching or seq.wants_prompt_logprobs:
            return [], None
        blocks: list[int] = []
        keys: list[BlockKey] = []
        for j in range((len(seq.token_ids) - 1) // self.block_size):
            key = self._key(seq, j, blocks[-1] if blocks else -1)
            block = self.allocator.peek(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        keep = len(blocks)
        if self.states is not None:  # only as far as the last block with its states kept
            keep = next((j for j in range(len(blocks), 0, -1) if keys[j - 1] in self.snapshots), 0)
            if len(blocks) > keep:
                seq.divergence = (len(blocks) * self.block_size, keys[-1])
        held = [self.allocator.lookup(key) for key in keys[:keep]]
        return [b for b in held if b is not None], (keys[keep - 1] if keep and self.states else None)

    def cache_blocks(self, seq: Sequence) -> None:
        """Offer seq's blocks that became full and computed (their writes queued, their tokens known to
        the host) to the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(seq.num_cached, len(seq.token_ids)) // self.block_size
        for j in range(seq.num_registered, full):
            self.allocator.register(seq.blocks[j], self._key(seq, j, seq.blocks[j - 1] if j else -1))
        seq.num_registered = max(seq.num_registered, full)
        # Each snapshot whose block is now computed and cached is kept under that block's key (a block of
        # its own whose key another block already holds is not cached, and no prefix walk reaches it: its
        # snapshot goes back)
        waiting = []
        for j, slot, known in seq.snapshots:
            if j >= full:
                waiting.append((j, slot, known))
                continue
            self._pending.discard(known)
            key = known if known is not None else self.allocator.key_of(seq.blocks[j])
            if key is None or key in self.snapshots:
                self._free_snapshots.append(slot)
            else:
                self.snapshots[key] = slot
        seq.snapshots = waiting

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        self._give_back_state(seq)
        self.drop_snapshot(seq)
        seq.blocks, seq.status = [], Status.FINISHED

    def start_running(self, seq: Sequence) -> None:
        """`seq` runs from this step on (its blocks are the caller's to set): with linear attention it
        takes a state slot."""
        if self.states is not None:
            seq.state_slot = self.states.take()
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _give_back_state(self, seq: Sequence) -> None:
        if self.states is not None:
            self.states.give_back(seq.state_slot)
        seq.state_slot = -1
