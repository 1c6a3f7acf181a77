"""An approximate radix tree of what every instance has been sent (SGLang router style).

One tree serves the whole fleet: each node records the instances ("tenants") that were sent
a prompt through it and when each last was. It is approximate because it records routing,
not the engines' caches: an engine may have evicted what the tree says it holds (policies
that see engine metrics discount the claim), and the tree's own bound evicts per tenant.

Keys are strings: prompt text, or `token_key(ids)` with one character per token. Edge labels
are compared with `str.startswith` in chunks, so matching and inserting cost O(len(key))
with the character work done in C.

Invariant: a tenant that holds a node holds all of its ancestors (inserts walk from the
root, and eviction removes only a tenant's deepest nodes). It lets `match` read every
tenant's longest match off one walk down, and eviction go in (tick, deepest-first) order.
"""

from __future__ import annotations

import heapq
from itertools import count

# Label comparison starts with chunks of this many characters and halves down to one.
_CHUNK = 64
# Automatic eviction frees down to this fraction of the bound, so that it runs once per
# tenth of the bound inserted rather than on every insert past it.
_LOW_WATER = 0.9


class _Node:
    __slots__ = ("label", "parent", "children", "tenants")

    def __init__(self, label: str, parent: _Node | None) -> None:
        self.label = label  # the edge from the parent
        self.parent = parent
        self.children: dict[str, _Node] = {}  # by the first character of their label
        # tenant -> tick of its last insert through here; most recent last (match reads
        # newest first, and a recent claim is the likelier to still be cached).
        self.tenants: dict[str, int] = {}


def common_prefix_length(label: str, key: str, start: int) -> int:
    """The length of the common prefix of `label` and `key[start:]`."""
    if key.startswith(label, start):
        return len(label)
    end = min(len(label), len(key) - start)
    n, step = 0, _CHUNK
    while step:  # whole chunks, then a binary search inside the one that differs
        while n + step <= end and key.startswith(label[n:n + step], start + n):
            n += step
        step //= 2
    return n


class RadixTree:
    """Prefixes per tenant, with each tenant's size kept under `max_chars_per_tenant`."""

    def __init__(self, max_chars_per_tenant: int | None = None) -> None:
        self.max_chars_per_tenant = max_chars_per_tenant
        self._root = _Node("", None)
        self._chars: dict[str, int] = {}  # tenant -> characters of the labels it holds
        self._clock = 0  # a counter, not wall time: cheaper, and only the order matters

    def insert(self, key: str, tenant: str) -> None:
        """Record that `tenant` was sent `key`; evicts its oldest entries past the bound."""
        self._clock += 1
        chars = self._chars.get(tenant, 0)
        node, i = self._root, 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                child = node.children[key[i]] = _Node(key[i:], node)
            else:
                n = common_prefix_length(child.label, key, i)
                if n < len(child.label):
                    child = self._split(child, n)
            if child.tenants.pop(tenant, None) is None:
                chars += len(child.label)
            child.tenants[tenant] = self._clock
            i += len(child.label)
            node = child
        self._chars[tenant] = chars
        bound = self.max_chars_per_tenant
        if bound is not None and chars > bound:
            self._evict_tenant(tenant, int(bound * _LOW_WATER))

    def match(self, key: str, limit: int | None = None) -> dict[str, int]:
        """tenant -> the length of its longest prefix of `key`, for every tenant holding one.

        Deepest matches come first, most recent first among equals; `limit` stops after that
        many tenants, which bounds the work when a short common prefix (a system prompt) is
        held by the whole fleet.
        """
        found: dict[str, int] = {}
        for node, length in reversed(self._walk(key)):
            for tenant in reversed(node.tenants):
                if tenant not in found:
                    found[tenant] = length
                    if limit is not None and len(found) >= limit:
                        return found
        return found

    def matched_length(self, key: str, tenant: str) -> int:
        """The length of `tenant`'s longest prefix of `key` (0 if none)."""
        length = 0
        for node, end in self._walk(key):
            if tenant not in node.tenants:
                break
            length = end
        return length

    def remove_tenant(self, tenant: str) -> None:
        if self._chars.pop(tenant, None) is None:
            return
        stack = [self._root]
        while stack:
            node = stack.pop()
            for child in list(node.children.values()):
                if child.tenants.pop(tenant, None) is None:
                    continue  # not held by the tenant, nor is anything below it
                if child.tenants:
                    stack.append(child)
                else:  # held by no one else, so nothing below it is either
                    del node.children[child.label[0]]

    def evict(self, max_chars_per_tenant: int) -> None:
        """Evict least recently used entries until every tenant holds at most this much."""
        for tenant, chars in list(self._chars.items()):
            if chars > max_chars_per_tenant:
                self._evict_tenant(tenant, max_chars_per_tenant)

    def tenant_chars(self, tenant: str) -> int:
        return self._chars.get(tenant, 0)

    @property
    def tenants(self) -> list[str]:
        return list(self._chars)

    def node_count(self) -> int:
        nodes, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            nodes += len(node.children)
            stack.extend(node.children.values())
        return nodes

    def _walk(self, key: str) -> list[tuple[_Node, int]]:
        """The nodes `key` runs through, each with the key length matched by its end."""
        path: list[tuple[_Node, int]] = []
        node, i = self._root, 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                break
            n = common_prefix_length(child.label, key, i)
            i += n
            path.append((child, i))
            if n < len(child.label):
                break
            node = child
        return path

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after `n` characters; the new upper node keeps its tenants."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.label[:n], parent)
        upper.tenants = dict(child.tenants)
        parent.children[upper.label[0]] = upper
        child.label = child.label[n:]
        child.parent = upper
        upper.children[child.label[0]] = child
        return upper

    def _evict_tenant(self, tenant: str, target: int) -> None:
        # Every insert stamps a whole path with one tick, so a node's tick is never older
        # than its descendants': ordering by (tick, deepest first) pops a node only after
        # everything below it that the tenant held, so only leaves of the tenant go.
        heap: list[tuple[int, int, int, _Node]] = []
        order = count()
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            for child in node.children.values():
                tick = child.tenants.get(tenant)
                if tick is not None:
                    heap.append((tick, -depth - 1, next(order), child))
                    stack.append((child, depth + 1))
        heapq.heapify(heap)
        chars = self._chars[tenant]
        while chars > target and heap:
            node = heapq.heappop(heap)[3]
            del node.tenants[tenant]
            chars -= len(node.label)
            if not node.tenants:
                parent = node.parent
                assert parent is not None
                del parent.children[node.label[0]]
        self._chars[tenant] = chars
