//! An interval tree over address ranges.
//!
//! When part of an address space is invalidated (unmapped, migrated, protected), every
//! interval notifier whose range overlaps the invalidated range must be told. A process can
//! register thousands of notifiers, so scanning them all on every invalidation is too slow;
//! [`IntervalTree`] finds the overlapping ones directly. It is plain safe Rust (no `unsafe`,
//! no raw pointers) so that it can be checked under valgrind.
//!
//! # Structure
//!
//! The tree is a treap stored in an index-based arena: nodes live in a `Vec` of slots with
//! a free list, and children are `u32` indices (with `NIL` for "none"). Invariants:
//!
//! - BST order: nodes are ordered by `(start, key)`; every node in a left subtree sorts
//!   before its parent, every node in a right subtree after it.
//! - Heap order: a node's random priority is at least that of each of its children.
//! - Augmentation: each node's `max_end` is the largest `end` in its subtree.
//!
//! A query skips any subtree whose `max_end` is at or below the query start, and skips
//! right subtrees once a node starts at or after the query end.
//!
//! # Complexity
//!
//! With `n` intervals, insert and remove take expected `O(log n)` time, and a query that
//! reports `k` intervals takes expected `O(log n + k)`. Recursion only ever follows one
//! path (or, for merges, two paths) from the root, so its depth is bounded by the height,
//! which is expected `O(log n)`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;

/// Index meaning "no node".
const NIL: u32 = u32::MAX;

/// Key of an inserted interval, stable until that interval is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IntervalKey(u64);

/// One interval stored in the arena.
struct Node<T> {
    start: usize,
    /// Equal to `start` for an empty interval, which never matches a query.
    end: usize,
    max_end: usize,
    key: u64,
    priority: u64,
    /// Left (`[0]`) and right (`[1]`) children.
    child: [u32; 2],
    value: T,
}

/// A set of half-open intervals `[start, end)` that answers overlap queries quickly.
pub(crate) struct IntervalTree<T> {
    nodes: Vec<Option<Node<T>>>,
    free: Vec<u32>,
    index: HashMap<u64, u32>,
    root: u32,
    next_key: u64,
    rng: u64,
}

impl<T> fmt::Debug for IntervalTree<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntervalTree").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<T> Default for IntervalTree<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> IntervalTree<T> {
    /// Creates an empty tree.
    pub(crate) fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            root: NIL,
            next_key: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Inserts the half-open interval `[start, end)` and returns its key.
    ///
    /// `start < end` is expected; otherwise the interval is stored as empty and never
    /// matches a query (and debug builds assert).
    pub(crate) fn insert(&mut self, start: usize, end: usize, value: T) -> IntervalKey {
        debug_assert!(start < end, "empty interval [{start:#x}, {end:#x})");
        let end = end.max(start);
        let key = self.next_key;
        self.next_key += 1;
        let priority = self.next_priority();
        let node = Node { start, end, max_end: end, key, priority, child: [NIL; 2], value };
        let idx = self.free.pop().unwrap_or_else(|| {
            self.nodes.push(None);
            let idx = u32::try_from(self.nodes.len() - 1).unwrap_or(NIL);
            assert_ne!(idx, NIL, "interval tree holds at most u32::MAX - 1 nodes");
            idx
        });
        self.nodes[idx as usize] = Some(node);
        self.index.insert(key, idx);
        self.root = self.insert_at(self.root, idx);
        IntervalKey(key)
    }

    /// Removes the interval with this key and returns its value, or `None` if it is absent.
    pub(crate) fn remove(&mut self, key: IntervalKey) -> Option<T> {
        let idx = self.index.remove(&key.0)?;
        self.root = self.remove_at(self.root, idx);
        self.free.push(idx);
        self.nodes[idx as usize].take().map(|node| node.value)
    }

    /// Returns the value of the interval with this key, if it is present.
    #[cfg(test)]
    pub(crate) fn get(&self, key: IntervalKey) -> Option<&T> {
        self.index.get(&key.0).map(|&idx| &self.node(idx).value)
    }

    /// Returns the number of intervals in the tree.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Returns `true` if the tree holds no intervals.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Calls `f(key, start, end, value)` for every interval overlapping `[start, end)`, in
    /// increasing order of interval start (ties in any order).
    ///
    /// `[a, b)` overlaps `[s, e)` iff `a < e && s < b`; touching intervals do not overlap.
    pub(crate) fn for_each_overlapping(
        &self,
        start: usize,
        end: usize,
        mut f: impl FnMut(IntervalKey, usize, usize, &T),
    ) {
        let mut visited = 0;
        self.walk(self.root, start, end, &mut visited, &mut |k, s, e, v| f(k, s, e, v));
    }

    /// Returns the key and value of every interval overlapping `[start, end)`, in increasing
    /// order of interval start.
    #[cfg(test)]
    pub(crate) fn overlapping(&self, start: usize, end: usize) -> Vec<(IntervalKey, &T)> {
        let mut out = Vec::new();
        let mut visited = 0;
        self.walk(self.root, start, end, &mut visited, &mut |k, _, _, v| out.push((k, v)));
        out
    }

    /// In-order walk that prunes subtrees which cannot overlap `[start, end)`, counting
    /// the nodes it enters in `visited`.
    fn walk<'a>(
        &'a self,
        idx: u32,
        start: usize,
        end: usize,
        visited: &mut usize,
        f: &mut impl FnMut(IntervalKey, usize, usize, &'a T),
    ) {
        if idx == NIL || start >= end {
            return;
        }
        *visited += 1;
        let node = self.node(idx);
        if node.max_end <= start {
            return;
        }
        self.walk(node.child[0], start, end, visited, f);
        if node.start < end {
            if node.start < node.end && start < node.end {
                f(IntervalKey(node.key), node.start, node.end, &node.value);
            }
            self.walk(node.child[1], start, end, visited, f);
        }
    }

    fn next_priority(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn node(&self, idx: u32) -> &Node<T> {
        self.nodes[idx as usize].as_ref().expect("interval tree: link to a free slot")
    }

    fn node_mut(&mut self, idx: u32) -> &mut Node<T> {
        self.nodes[idx as usize].as_mut().expect("interval tree: link to a free slot")
    }

    fn max_end_of(&self, idx: u32) -> usize {
        if idx == NIL { 0 } else { self.node(idx).max_end }
    }

    fn priority_of(&self, idx: u32) -> u64 {
        self.node(idx).priority
    }

    /// Recomputes `max_end` of `idx` from its own end and its children.
    fn update(&mut self, idx: u32) {
        let node = self.node(idx);
        let [l, r] = node.child;
        let max = node.end.max(self.max_end_of(l)).max(self.max_end_of(r));
        self.node_mut(idx).max_end = max;
    }

    /// Rotates child `d` of `x` (0: left, 1: right) up into `x`'s place; returns it.
    fn rotate(&mut self, x: u32, d: usize) -> u32 {
        let c = self.node(x).child[d];
        self.node_mut(x).child[d] = self.node(c).child[1 - d];
        self.node_mut(c).child[1 - d] = x;
        self.update(x);
        self.update(c);
        c
    }

    /// Which child of `root` the subtree holding node `idx` hangs from.
    fn side(&self, root: u32, idx: u32) -> usize {
        let (n, r) = (self.node(idx), self.node(root));
        usize::from((n.start, n.key) > (r.start, r.key))
    }

    /// Inserts node `new` into the subtree at `root`; returns the new subtree root.
    fn insert_at(&mut self, root: u32, new: u32) -> u32 {
        if root == NIL {
            return new;
        }
        let d = self.side(root, new);
        let child = self.insert_at(self.node(root).child[d], new);
        self.node_mut(root).child[d] = child;
        if self.priority_of(child) > self.priority_of(root) {
            return self.rotate(root, d);
        }
        self.update(root);
        root
    }

    /// Unlinks node `target` from the subtree at `root`; returns the new subtree root.
    fn remove_at(&mut self, root: u32, target: u32) -> u32 {
        debug_assert_ne!(root, NIL, "interval tree: removed node not found");
        if root == NIL {
            return NIL;
        }
        if root == target {
            let [l, r] = self.node(root).child;
            return self.merge(l, r);
        }
        let d = self.side(root, target);
        let child = self.remove_at(self.node(root).child[d], target);
        self.node_mut(root).child[d] = child;
        self.update(root);
        root
    }

    /// Joins two subtrees where every node of `a` sorts before every node of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL || b == NIL {
            return if a == NIL { b } else { a };
        }
        // The higher-priority root stays on top; merge into its inner side.
        let (top, d, x, y) = if self.priority_of(a) > self.priority_of(b) {
            (a, 1, self.node(a).child[1], b)
        } else {
            (b, 0, a, self.node(b).child[0])
        };
        let child = self.merge(x, y);
        self.node_mut(top).child[d] = child;
        self.update(top);
        top
    }
}

#[cfg(test)]
impl<T> IntervalTree<T> {
    /// Panics unless BST order, heap order, `max_end` and the key index are all consistent.
    fn check_invariants(&self) {
        let count = self.check_subtree(self.root, None, None).map_or(0, |(n, _)| n);
        assert_eq!(count, self.len(), "reachable nodes vs index");
        let live = self.nodes.iter().filter(|slot| slot.is_some()).count();
        assert_eq!(live, self.len(), "occupied slots vs index");
        assert_eq!(self.nodes.len() - live, self.free.len(), "free slots vs free list");
        for (&key, &idx) in &self.index {
            assert_eq!(self.node(idx).key, key, "index points at the wrong node");
        }
    }

    /// Checks the subtree at `idx` against the exclusive bounds; returns (size, max_end).
    fn check_subtree(
        &self,
        idx: u32,
        lo: Option<(usize, u64)>,
        hi: Option<(usize, u64)>,
    ) -> Option<(usize, usize)> {
        if idx == NIL {
            return None;
        }
        let node = self.node(idx);
        let order = (node.start, node.key);
        assert!(lo.is_none_or(|lo| lo < order), "BST order violated (left bound)");
        assert!(hi.is_none_or(|hi| order < hi), "BST order violated (right bound)");
        let mut size = 1;
        let mut max_end = node.end;
        let [l, r] = node.child;
        for (child, lo, hi) in [(l, lo, Some(order)), (r, Some(order), hi)] {
            if child != NIL {
                assert!(self.priority_of(child) <= node.priority, "heap order violated");
            }
            if let Some((n, m)) = self.check_subtree(child, lo, hi) {
                size += n;
                max_end = max_end.max(m);
            }
        }
        assert_eq!(node.max_end, max_end, "stale max_end");
        Some((size, max_end))
    }

    /// Returns how many nodes a query for `[start, end)` enters.
    fn visited_for(&self, start: usize, end: usize) -> usize {
        let mut visited = 0;
        self.walk(self.root, start, end, &mut visited, &mut |_, _, _, _| {});
        visited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorted keys found by both query methods, after checking their order and agreement.
    fn keys_of<T>(tree: &IntervalTree<T>, start: usize, end: usize) -> Vec<IntervalKey> {
        let mut keys = Vec::new();
        tree.for_each_overlapping(start, end, |k, s, e, _| {
            assert!(s < end && start < e, "reported a non-overlapping interval");
            assert!(keys.last().is_none_or(|&(_, last)| last <= s), "not sorted by start");
            keys.push((k, s));
        });
        let mut keys: Vec<IntervalKey> = keys.into_iter().map(|(k, _)| k).collect();
        let via_vec: Vec<IntervalKey> = tree.overlapping(start, end).iter().map(|p| p.0).collect();
        assert_eq!(via_vec, keys, "overlapping() disagrees with for_each_overlapping()");
        keys.sort();
        keys
    }

    /// A small seeded generator (xorshift64*), so the test replays exactly.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_ops_match_brute_force_model() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut tree = IntervalTree::new();
        let mut model: Vec<(IntervalKey, usize, usize, u64)> = Vec::new();
        let mut removed: Vec<IntervalKey> = Vec::new();
        let mut queries_with_hits = 0;
        for op in 0..20_000 {
            match rng.below(10) {
                0..=3 => {
                    let start = rng.below(4096);
                    let end = start + 1 + rng.below(511);
                    let value = rng.next();
                    let key = tree.insert(start, end, value);
                    assert!(model.iter().all(|m| m.0 != key), "key reused");
                    assert_eq!(tree.get(key), Some(&value));
                    model.push((key, start, end, value));
                }
                4..=6 if !model.is_empty() => {
                    let (key, _, _, value) = model.swap_remove(rng.below(model.len()));
                    assert_eq!(tree.remove(key), Some(value));
                    assert_eq!(tree.get(key), None);
                    removed.push(key);
                }
                7 if !removed.is_empty() => {
                    let key = removed[rng.below(removed.len())];
                    assert_eq!(tree.remove(key), None, "stale key removed something");
                }
                _ => {
                    let start = rng.below(4700);
                    let end = start + 1 + rng.below(300);
                    let mut expected: Vec<IntervalKey> =
                        model.iter().filter(|m| m.1 < end && start < m.2).map(|m| m.0).collect();
                    expected.sort();
                    assert_eq!(keys_of(&tree, start, end), expected, "query [{start}, {end})");
                    queries_with_hits += usize::from(!expected.is_empty());
                }
            }
            assert_eq!(tree.len(), model.len());
            assert_eq!(tree.is_empty(), model.is_empty());
            if op % 100 == 0 {
                tree.check_invariants();
            }
        }
        tree.check_invariants();
        assert!(queries_with_hits > 1000, "model test barely exercised overlaps");
        for (key, _, _, value) in model.drain(..) {
            assert_eq!(tree.remove(key), Some(value));
        }
        assert!(tree.is_empty());
        tree.check_invariants();
    }

    #[test]
    fn edge_cases() {
        let mut tree = IntervalTree::default();
        assert!(tree.is_empty());
        assert!(tree.overlapping(0, usize::MAX).is_empty(), "empty tree matched");
        assert_eq!(tree.visited_for(0, usize::MAX), 0);
        assert_eq!(tree.get(IntervalKey(0)), None);
        tree.check_invariants();

        // Touching intervals do not overlap.
        let a = tree.insert(0, 10, 'a');
        let b = tree.insert(10, 20, 'b');
        assert_eq!(tree.overlapping(10, 20), vec![(b, &'b')]);
        assert_eq!(tree.overlapping(0, 10), vec![(a, &'a')]);
        assert_eq!(tree.overlapping(9, 11), vec![(a, &'a'), (b, &'b')]);
        assert!(tree.overlapping(20, 30).is_empty());
        assert!(tree.overlapping(5, 5).is_empty(), "empty query matched");

        // A small query inside a huge interval.
        let huge = tree.insert(0, usize::MAX, 'h');
        assert_eq!(tree.overlapping(25, 26), vec![(huge, &'h')]);
        assert_eq!(tree.overlapping(5, 6).len(), 2);

        // Removing twice; `get` after remove; a reused slot does not revive the old key.
        assert_eq!(tree.get(a), Some(&'a'));
        assert_eq!(tree.remove(a), Some('a'));
        assert_eq!(tree.remove(a), None);
        assert_eq!(tree.get(a), None);
        assert_eq!(tree.len(), 2);
        let c = tree.insert(0, 10, 'c');
        assert_ne!(a, c);
        assert_eq!(tree.remove(a), None);
        assert_eq!(tree.get(a), None);
        assert_eq!(tree.overlapping(5, 6), vec![(huge, &'h'), (c, &'c')]);
        tree.check_invariants();
    }

    #[test]
    fn queries_visit_few_nodes_at_scale() {
        let mut tree = IntervalTree::new();
        let small: Vec<IntervalKey> =
            (0..10_000).map(|i| tree.insert(i * 16, i * 16 + 8, i)).collect();
        // Keys increase with insertion, so `huge` is sorted and sorts after `small`.
        let huge: Vec<IntervalKey> = (0..10).map(|i| tree.insert(i, 160_000 + i, i)).collect();
        tree.check_invariants();

        let (start, end) = (5_000 * 16 + 2, 5_000 * 16 + 4);
        assert_eq!(keys_of(&tree, start, end), [&[small[5_000]], &huge[..]].concat());
        let visited = tree.visited_for(start, end);
        assert!(visited < 200, "query visited {visited} of {} nodes", tree.len());

        // A query in a gap between small intervals finds only the huge ones.
        let (gap_start, gap_end) = (7_000 * 16 + 9, 7_000 * 16 + 15);
        assert_eq!(keys_of(&tree, gap_start, gap_end), huge);
        assert!(tree.visited_for(gap_start, gap_end) < 200);
    }
}
