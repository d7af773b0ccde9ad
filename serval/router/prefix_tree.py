"""An approximate radix tree of recent prompt prefixes: one per backend, for cache-aware routing.

Approximate because the router sees text, not tokens, and does not know what a backend has evicted: the tree
remembers what was sent to the backend recently, which is what its prefix cache most likely still holds.
Characters rather than tokens keep the router tokenizer-free (it fronts models with different tokenizers).
Past max_chars the least recently used leaves are evicted, as the backend's own cache would.
"""
from __future__ import annotations

import itertools


class _Node:
    __slots__ = ("label", "children", "parent", "last_used")

    def __init__(self, label: str, parent: "_Node | None", last_used: int) -> None:
        self.label = label
        self.children: dict[str, _Node] = {}  # first character of the child's label -> child
        self.parent = parent
        self.last_used = last_used


class PrefixTree:
    def __init__(self, max_chars: int = 4_000_000) -> None:
        self.root = _Node("", None, 0)
        self.max_chars = max_chars
        self.num_chars = 0
        # A logical clock: deterministic LRU order, no wall-clock reads on the request path.
        self._clock = itertools.count(1)

    def match(self, text: str) -> int:
        """Length of the longest prefix of text stored in the tree (touching the path as used)."""
        now = next(self._clock)
        node, position = self.root, 0
        while position < len(text):
            child = node.children.get(text[position])
            if child is None:
                break
            common = _common_prefix(child.label, text, position)
            child.last_used = now
            position += common
            if common < len(child.label):
                break
            node = child
        return position

    def insert(self, text: str) -> None:
        now = next(self._clock)
        node, position = self.root, 0
        while position < len(text):
            child = node.children.get(text[position])
            if child is None:
                node.children[text[position]] = _Node(text[position:], node, now)
                self.num_chars += len(text) - position
                break
            common = _common_prefix(child.label, text, position)
            if common < len(child.label):
                child = self._split(child, common)
            child.last_used = now
            position += common
            node = child
        if self.num_chars > self.max_chars:
            self.evict(self.max_chars * 9 // 10)  # hysteresis: don't evict on every insert once full

    def evict(self, target_chars: int) -> None:
        """Drop least recently used leaves until at most target_chars remain."""
        leaves = sorted(self._leaves(), key=lambda leaf: leaf.last_used)
        while leaves and self.num_chars > target_chars:
            leaf = leaves.pop(0)
            parent = leaf.parent
            del parent.children[leaf.label[0]]
            self.num_chars -= len(leaf.label)
            if parent is not self.root and not parent.children:
                # the parent is now a leaf; keep the order by recency
                index = next((i for i, other in enumerate(leaves) if other.last_used > parent.last_used),
                             len(leaves))
                leaves.insert(index, parent)

    def _split(self, child: _Node, at: int) -> _Node:
        """Split child's label at `at`: a new middle node takes the first part."""
        parent = child.parent
        middle = _Node(child.label[:at], parent, child.last_used)
        parent.children[middle.label[0]] = middle
        child.label = child.label[at:]
        child.parent = middle
        middle.children[child.label[0]] = child
        return middle

    def _leaves(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                yield node


def _common_prefix(label: str, text: str, position: int) -> int:
    """How many characters of label match text from position on."""
    if text.startswith(label, position):  # the usual case, at C speed
        return len(label)
    limit = min(len(label), len(text) - position)
    low, high = 0, limit  # binary search on slice equality: O(log n) comparisons, each at C speed
    while low < high:
        middle = (low + high + 1) // 2
        if label[:middle] == text[position:position + middle]:
            low = middle
        else:
            high = middle - 1
    return low
