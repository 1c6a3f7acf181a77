"""The routing policies' shared radix tree (router/policies/radix_tree.py)."""

from __future__ import annotations

import random

from router.policies.base import token_key
from router.policies.radix_tree import RadixTree, common_prefix_length


def test_match_lengths_per_tenant():
    tree = RadixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    tree.insert("goodbye", "c")
    assert tree.match("hello world, again") == {"a": 11, "b": 6}
    assert tree.match("hello there") == {"b": 11, "a": 6}
    assert tree.match("hel") == {"a": 3, "b": 3}
    assert tree.match("good day") == {"c": 4}
    assert tree.match("xyz") == {}
    assert tree.match("") == {}


def test_edge_splits_keep_every_tenant_exact():
    tree = RadixTree()
    tree.insert("abcdefgh", "a")
    tree.insert("abcdxyz", "b")  # splits "abcdefgh" after "abcd"
    tree.insert("ab", "c")  # splits again, inside the shared part
    tree.insert("abcdefgh", "b")
    assert tree.match("abcdefgh") == {"b": 8, "a": 8, "c": 2}
    assert tree.match("abcdxy") == {"b": 6, "a": 4, "c": 2}
    assert tree.match("abq") == {"c": 2, "b": 2, "a": 2}
    assert tree.matched_length("abcdefgh", "c") == 2
    assert tree.matched_length("abcdxyz", "a") == 4
    assert tree.matched_length("abcdxyz", "nobody") == 0
    # "ab" | "cd" | "efgh", "xyz": four nodes however the keys arrived.
    assert tree.node_count() == 4
    assert tree.tenant_chars("a") == 8 and tree.tenant_chars("b") == 11
    assert tree.tenant_chars("c") == 2


def test_match_limit_prefers_the_deepest_then_the_most_recent():
    tree = RadixTree()
    for tenant in "abcd":
        tree.insert("system prompt: " + tenant, tenant)
    tree.insert("system prompt: c and more", "c")
    found = tree.match("system prompt: c and more", limit=2)
    assert list(found) == ["c", "d"]  # c holds it all; d is the newest of the rest
    assert found == {"c": 25, "d": 15}


def test_remove_tenant_drops_only_its_nodes():
    tree = RadixTree()
    tree.insert("shared prefix one", "a")
    tree.insert("shared prefix two", "b")
    tree.remove_tenant("a")
    assert tree.match("shared prefix one") == {"b": 14}
    assert tree.tenant_chars("a") == 0 and tree.tenants == ["b"]
    assert tree.node_count() == 2  # the split node stays; "one" is gone
    tree.remove_tenant("b")
    assert tree.node_count() == 0
    tree.remove_tenant("never-seen")


def test_eviction_keeps_each_tenant_under_its_bound_and_goes_lru_first():
    tree = RadixTree()
    keys = {tenant: [first + fill * 99 for first in "ABCDEFGHIJ"]  # 100 chars, no sharing
            for tenant, fill in (("a", "x"), ("b", "y"))}
    for i in range(10):
        tree.insert(keys["a"][i], "a")
        tree.insert(keys["b"][i], "b")
    tree.insert(keys["a"][0], "a")  # a's oldest, touched again
    tree.evict(500)
    assert tree.tenant_chars("a") == 500 and tree.tenant_chars("b") == 500
    held = {tenant: [tree.matched_length(k, tenant) == 100 for k in keys[tenant]]
            for tenant in keys}
    assert held["a"] == [True] + [False] * 5 + [True] * 4  # B..F: least recently used
    assert held["b"] == [False] * 5 + [True] * 5


def test_eviction_on_insert_and_shared_ancestors():
    tree = RadixTree(max_chars_per_tenant=1000)
    system = "s" * 200
    for i in range(50):
        tree.insert(system + f"question {i:03d}" + "q" * 50, "a")
        assert tree.tenant_chars("a") <= 1000
    # The shared system prompt outlives the old questions below it.
    assert tree.matched_length(system + "question 049", "a") == len(system) + 12
    old = system + "question 000" + "q" * 50
    assert len(system) <= tree.matched_length(old, "a") < len(old)
    assert tree.tenant_chars("a") == _held_chars(tree, "a")


def test_token_keys_including_surrogate_range_ids():
    tree = RadixTree()
    ids = [1, 0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 150_000, 0x10FFFF]
    tree.insert(token_key(ids), "a")
    tree.insert(token_key(ids[:4] + [7, 8]), "b")
    assert tree.match(token_key(ids)) == {"a": 9, "b": 4}
    assert tree.match(token_key(ids[:5] + [9])) == {"a": 5, "b": 4}
    assert tree.matched_length(token_key([0xD800]), "a") == 0


def test_long_keys():
    rng = random.Random(0)
    base = "".join(rng.choice("abcdefgh") for _ in range(20_000))
    tree = RadixTree()
    tree.insert(base, "a")
    tree.insert(base[:12_345] + "Z" + base[12_346:], "b")
    tree.insert(base[:777], "c")
    assert tree.match(base) == {"a": 20_000, "b": 12_345, "c": 777}
    assert tree.match(base[:15_000] + "!") == {"a": 15_000, "b": 12_345, "c": 777}
    assert tree.tenant_chars("b") == 20_000


def test_common_prefix_length():
    text = "x" * 300
    assert common_prefix_length(text, text + "y", 0) == 300
    for cut in (0, 1, 63, 64, 65, 127, 200, 299):
        other = text[:cut] + "y" + text[cut + 1:]
        assert common_prefix_length(text, "__" + other, 2) == cut
    assert common_prefix_length("abcdef", "zzabc", 2) == 3  # the key ends first


def test_random_inserts_match_a_brute_force_model():
    rng = random.Random(1)
    tree = RadixTree()
    sent: dict[str, list[str]] = {}
    for _ in range(300):
        key = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
        tenant = rng.choice("pqr")
        tree.insert(key, tenant)
        sent.setdefault(tenant, []).append(key)
    for _ in range(200):
        query = "".join(rng.choice("ab") for _ in range(rng.randint(0, 14)))
        expected = {}
        for tenant, keys in sent.items():
            best = max(common_prefix_length(k, query, 0) for k in keys)
            if best:
                expected[tenant] = best
        assert tree.match(query) == expected


def _held_chars(tree: RadixTree, tenant: str) -> int:
    total, stack = 0, [tree._root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            if tenant in child.tenants:
                total += len(child.label)
            stack.append(child)
    return total
