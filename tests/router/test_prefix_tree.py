"""The approximate radix tree: longest stored prefix, edge splits, LRU eviction by characters."""
from serval.router.prefix_tree import PrefixTree


def test_match_is_the_longest_stored_prefix():
    tree = PrefixTree()
    assert tree.match("anything") == 0
    tree.insert("system: you are helpful. user: hi")
    assert tree.match("system: you are helpful. user: hi") == 33
    assert tree.match("system: you are helpful. user: bye") == len("system: you are helpful. user: ")
    assert tree.match("sys") == 3
    assert tree.match("other") == 0
    assert tree.num_chars == 33


def test_insert_splits_edges_and_counts_characters_once():
    tree = PrefixTree()
    tree.insert("abcdef")
    tree.insert("abcxyz")
    tree.insert("abcdef")  # already there
    assert tree.num_chars == len("abc") + len("def") + len("xyz")
    assert tree.match("abcdefg") == 6 and tree.match("abcxy") == 5 and tree.match("abq") == 2
    tree.insert("ab")  # a prefix of stored text adds nothing
    assert tree.num_chars == 9


def test_eviction_drops_least_recently_used_prefixes():
    tree = PrefixTree(max_chars=30)
    tree.insert("a" * 10)
    tree.insert("b" * 10)
    tree.match("a" * 10)  # a is now more recent than b
    tree.insert("c" * 15)  # 35 > 30: evict down to 27
    assert tree.num_chars <= 27
    assert tree.match("b" * 10) == 0
    assert tree.match("a" * 10) == 10 and tree.match("c" * 15) == 15


def test_eviction_climbs_to_parents_that_become_leaves():
    tree = PrefixTree(max_chars=1000)
    tree.insert("shared-prefix-1")
    tree.insert("shared-prefix-2")
    tree.evict(0)
    assert tree.num_chars == 0 and tree.match("shared") == 0
