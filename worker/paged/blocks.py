"""Which KV blocks each row holds, and which full blocks of earlier rows can be reused.

The pool is `num_blocks` blocks of `block_size` token slots. A row holds a block table: the blocks
its tokens fill, in order. A full block a row filled is registered under a chained hash (its
tokens and the hash of the block before it): a prompt's blocks once it is written, the generated
tokens' blocks when the row leaves. A later prompt that starts with the same tokens (the same
system prompt, or a chat's earlier turns with their answers) takes the same blocks instead of
computing their keys and values again. Blocks are reference-counted, and only full, registered
ones are ever shared, so no row ever writes into a block another row reads. A block whose last holder left goes to the back of the free list, still
registered: it is reused by a later prompt if one asks for it first, and overwritten (its
registration dropped) when the free list reaches it, least recently freed first (LRU).

Plain Python and no tensors: the scheduler-side bookkeeping, tested with integer tokens.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


class PoolExhausted(RuntimeError):
    """No free block is left (the admission budget should make this impossible)."""


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The key of a full block: its tokens and everything before them (through the parent's key)."""
    return hash((parent, tuple(tokens)))


@dataclass
class _Block:
    refs: int = 0
    key: int | None = None  # chained hash while registered
    tokens: tuple[int, ...] = ()  # the registered tokens (a hash match is confirmed against them)


@dataclass
class Table:
    """One row's blocks and how many of its token slots are filled."""
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    registered: int = 0  # leading blocks already registered (or taken from the cache)


class BlockPool:
    """Reference-counted blocks with chained-hash reuse of full prompt blocks (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_key: dict[int, int] = {}
        self.hit_tokens = 0  # prompt tokens whose keys and values came from the cache
        self.miss_tokens = 0  # prompt tokens computed (while the prefix cache is on)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The registered blocks that hold the longest cached prefix of `tokens`, never all of them: the
        last prompt token is always computed (its logits choose the first new token)."""
        if not self.prefix_cache:
            return []
        bs = self.block_size
        found: list[int] = []
        parent: int | None = None
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % bs, bs):
            chunk = tuple(tokens[start:start + bs])
            parent = chain_hash(parent, chunk)
            block = self._by_key.get(parent)
            if block is None or self._blocks[block].tokens != chunk:
                break
            found.append(block)
        return found

    def allocate(self, tokens: Sequence[int], use_cache: bool = True) -> Table:
        """A table for a new row whose prompt is `tokens`: the cached prefix's blocks (shared), then fresh
        blocks for the rest. `length` is set to the cached tokens: the caller writes from there."""
        cached = self.cached_prefix(tokens) if use_cache else []
        for block in cached:
            self._take(block)
        table = Table(blocks=list(cached), length=len(cached) * self.block_size, registered=len(cached))
        try:
            self.reserve(table, len(tokens))
        except PoolExhausted:
            self.release(table)
            raise
        if self.prefix_cache:
            self.hit_tokens += table.length
            self.miss_tokens += len(tokens) - table.length
        return table

    def reserve(self, table: Table, length: int) -> None:
        """Enough blocks in `table` for `length` tokens (fresh ones at the end)."""
        while len(table.blocks) * self.block_size < length:
            table.blocks.append(self._fresh())

    def slot(self, table: Table, position: int) -> int:
        """The flat slot (block * block_size + offset) of token `position` of the row."""
        return table.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def register(self, table: Table, tokens: Sequence[int]) -> None:
        """Register the row's full blocks (its first len(tokens) tokens are written) for later prompts."""
        if not self.prefix_cache:
            return
        bs = self.block_size
        full = min(len(tokens), table.length) // bs
        parent = self._blocks[table.blocks[table.registered - 1]].key if table.registered else None
        for i in range(table.registered, full):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, chunk)
            block = self._blocks[table.blocks[i]]
            if parent not in self._by_key:  # an identical block registered by another row stays the one
                block.key, block.tokens = parent, chunk
                self._by_key[parent] = table.blocks[i]
            elif block.key is None:
                block.key, block.tokens = parent, chunk  # a copy: keeps the chain going, not the index
        table.registered = max(table.registered, full)

    def release(self, table: Table) -> None:
        """The row left: its blocks lose a holder; those with none go to the back of the free list."""
        for block in reversed(table.blocks):  # the prefix's first blocks are freed last: evicted last
            state = self._blocks[block]
            state.refs -= 1
            if state.refs == 0:
                self._free[block] = None
        table.blocks, table.length, table.registered = [], 0, 0

    # ---- internals -------------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        state = self._blocks[block]
        if state.refs == 0:
            del self._free[block]
        state.refs += 1

    def _fresh(self) -> int:
        """The least recently freed block, its registration dropped."""
        if not self._free:
            raise PoolExhausted(f"all {len(self._blocks)} KV blocks are in use")
        block, _ = self._free.popitem(last=False)
        state = self._blocks[block]
        if state.key is not None and self._by_key.get(state.key) == block:
            del self._by_key[state.key]
        state.key, state.tokens, state.refs = None, (), 1
        return block
