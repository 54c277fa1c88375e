"""BlockManager: the paged KV cache's bookkeeping (the cache tensors live in the model runner).

Blocks are fixed-size groups of cache slots. A sequence holds a block table (logical -> physical
block) that grows as it does; blocks go back to the pool the moment it finishes or is preempted.

Prefix caching: every full block is named by a hash chained over its tokens and everything before
it, so equal hashes mean equal prefixes. A new sequence reuses the cached full blocks of its prompt
(tokens verified, not just the hash) and computes only the rest. Blocks are reference-counted;
freed blocks keep their contents and hash and are evicted least-recently-freed first, only when
the pool needs them.

Parallel sampling (n > 1): when a request's first sequence finishes its prompt, its siblings fork
from it (`fork`): they take the same block table, every block's count raised, the partial last
block included. A block is written only past its sequence's computed tokens, so only that last
block can be written while shared: before the write, the writer gets its own copy
(copy-on-write, `grow`), and the model runner copies the block's K/V on the device before the
step's forward (`take_block_copies`). The last holder writes in place.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = freed longest ago). Freed blocks may still hold a
        # cached prefix and be found through `cached` until they are handed out again.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.seq_hashes: dict[int, list[int]] = {}  # seq id -> hashes of its full blocks, in order
        self.prefix_queries_total = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits_total = 0  # of which found
        self._num_cached_free = 0  # free blocks with a block_hash
        self.block_copies: list[tuple[int, int]] = []  # (src, dst) K/V copies the next step must make first
        self.copy_on_writes_total = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks still holding a reusable prefix (kept as a count: the server reads it every
        step, and counting tens of thousands of free blocks each time cost more than the step)."""
        return self._num_cached_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix lookup -------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical ids of the cached full blocks that start `seq`'s tokens (at least one token is
        always left to compute, so the step still produces logits)."""
        hits: list[int] = []
        parent = None
        bs = self.block_size
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            block_hash = hash((parent, tokens))
            block_id = self.cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = block_hash
        return hits

    # ---- allocation ----------------------------------------------------------------------------

    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        reused_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        new = self._blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return new + reused_free <= self.num_free_blocks

    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int, count_query: bool) -> None:
        """Give a waiting sequence its cached prefix blocks and room for `num_new_tokens` more."""
        assert not seq.block_table
        hashes = []
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:  # a cached block back in use
                del self.free_blocks[block_id]
                self._num_cached_free -= 1
            block.ref_count += 1
            hashes.append(block.block_hash)
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        self.seq_hashes[seq.seq_id] = hashes
        if count_query:
            self.prefix_queries_total += seq.num_tokens
            self.prefix_hits_total += seq.num_computed_tokens
        self.grow(seq, num_new_tokens)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed + self._needs_copy(seq, num_new_tokens) <= self.num_free_blocks

    def try_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """`grow` if `can_grow`; returns whether it did. The scheduler's call for every sequence
        every step: a decode mostly writes into a block it already holds alone (a new block is
        needed once every block_size tokens), which is checked first, inline."""
        start = seq.num_computed_tokens
        table = seq.block_table
        if start + num_new_tokens <= len(table) * self.block_size:  # no block to add
            # The block written first is shared (see `_needs_copy`; it is in the table, as the
            # write ends within it).
            if not (num_new_tokens and start % self.block_size
                    and self.blocks[table[start // self.block_size]].ref_count > 1):
                return True
        if not self.can_grow(seq, num_new_tokens):
            return False
        self.grow(seq, num_new_tokens)
        return True

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make the block table cover the sequence's computed tokens plus `num_new_tokens`, copying
        a shared block before it is written."""
        if self._needs_copy(seq, num_new_tokens):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            copy = self._take_free_block()
            self.blocks[shared].ref_count -= 1
            # A new list, not a change in place: see BlockTableRows in the model runner.
            seq.block_table = seq.block_table[:index] + [copy] + seq.block_table[index + 1 :]
            self.block_copies.append((shared, copy))
            self.copy_on_writes_total += 1
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def _needs_copy(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Would this step write into a block another sequence holds too (a forked partial block)?"""
        if num_new_tokens == 0 or seq.num_computed_tokens % self.block_size == 0:
            return False  # the first write starts a block of its own
        index = seq.num_computed_tokens // self.block_size
        return index < len(seq.block_table) and self.blocks[seq.block_table[index]].ref_count > 1

    def fork(self, parent: Sequence, child: Sequence, num_computed_tokens: int) -> None:
        """`child` shares all of `parent`'s blocks, which hold (or are being written with) its first
        `num_computed_tokens` tokens."""
        assert not child.block_table
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = num_computed_tokens
        self.seq_hashes[child.seq_id] = list(self.seq_hashes.get(parent.seq_id, []))

    def take_block_copies(self) -> list[tuple[int, int]]:
        copies, self.block_copies = self.block_copies, []
        return copies

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached prefix
            self._num_cached_free -= 1
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks the last step filled, so later prompts with the same prefix find them."""
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs  # a pending token is not known yet
        for i in range(len(hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = hash((hashes[-1] if hashes else None, tokens))
            hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                block.token_ids = tokens
                self.cached[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; tail blocks first, so they are evicted before shared prefixes."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not self.enable_prefix_caching and block.block_hash is not None:
                    if self.cached.get(block.block_hash) == block_id:
                        del self.cached[block.block_hash]
                    block.block_hash = None
                    block.token_ids = ()
                self.free_blocks[block_id] = None
                self._num_cached_free += block.block_hash is not None
                if self.block_copies:  # a copy into a block given back before its step ran
                    self.block_copies = [c for c in self.block_copies if c[1] != block_id]
        seq.block_table = []
        self.seq_hashes.pop(seq.seq_id, None)
