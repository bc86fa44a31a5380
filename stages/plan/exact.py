"""The exact strategy: every frame is created once, by the LCA of its holders.

1. Alignment.  VMAs that hold the same frames are put in one *group* with a
   consistent page offset (weighted union-find), whatever their addresses: a
   moved, split or partly unmapped VMA lines up with its ancestor's.  A group is
   one staging range, created by the LCA of the processes holding its VMAs; every
   frame of the group has a *slot* (its page in that range).
2. Equal content.  A frame with the same bytes as the frame the nearest ancestor
   holds at the same slot (or the parent at the same address, in a VMA of the same
   bounds) is merged into it: the child does not write it.
3. Units.  Each resulting frame is a unit: written once, at its slot, by the LCA
   of its holders.  A frame that cannot keep one slot (two positions across the
   group, or a fork-order conflict below) gets a slot of its own in an extra range
   of its creator ("relocated"): still one physical page, only more pieces.
4. Order.  In each process, the units it creates are written just before the
   first child that needs them is forked, its own frames after its last fork; the
   children are ordered to avoid overwriting a version a later child needs.
"""

from array import array
from itertools import compress, repeat

from .layout import Draft, expand, flat, pieces_of, without_gc
from .model import PAGE


class _Groups:
    """Weighted union-find over VMAs: pos(node) = pos(up[node]) + off[node]."""

    def __init__(self, nodes):
        self.up = list(range(len(nodes)))
        self.off = [0] * len(nodes)
        self.key = []
        shared = {}  # equal keys are one tuple (20,000 anonymous VMAs have one key)
        for i, v in enumerate(nodes):
            tag = None if v.inheritable else i
            if v.is_file:
                key = ("file", v.body["path"], v.body["pgoff"] // PAGE, tag)
            else:
                key = ("anon", None, 0, tag)
            self.key.append(shared.setdefault(key, key) if tag is None else key)

    def find(self, i):
        up, off = self.up, self.off
        path = []
        while up[i] != i:
            path.append(i)
            i = up[i]
        root = i
        for j in reversed(path):
            parent = up[j]
            if parent != root:
                off[j] += off[parent]
                up[j] = root
        return root, (off[path[0]] if path else 0)

    def union(self, a, ia, b, ib):
        """Align page ia of node a with page ib of node b; False if that contradicts."""
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        d = pa + ia - pb - ib  # pos(rb) relative to ra
        if ra == rb:
            return d == 0
        ka, kb = self.key[ra], self.key[rb]
        if ka[0] != kb[0] or ka[1] != kb[1] or ka[3] != kb[3] or ka[3] is not None:
            return False
        if ka[0] == "file" and kb[2] - d != ka[2]:
            return False
        self.up[rb] = ra
        self.off[rb] = d
        return True


@without_gc
def plan_exact(images):
    cls = images.content_class()
    parent = images.parent
    nodes = [v for pid in images.pids for v in images.vmas[pid] if v.plannable]
    groups = _Groups(nodes)
    misaligned = set()

    # 1. alignment by shared frames, then same-address parent/child VMAs
    nframes = images.nframes
    first_node = array("i", [-1]) * (nframes + 1)
    first_page = array("i", [0]) * (nframes + 1)
    firsts = []  # per node: at each page, the frame first seen there (else 0)
    zeros = array("I", [0]) * max((v.npages for v in nodes), default=0)
    for n, v in enumerate(nodes):
        ids = v.ids
        firsts.append(zeros[:v.npages] if ids is not None else None)
        if ids is None:
            continue
        mine = firsts[n]
        npages = len(ids)
        last = None  # (node, delta) of the last link united: the same link needs no union
        i = 0
        while i < npages:
            f = ids[i]
            if not f:
                i += 1 if i + 1 < npages and ids[i + 1] else _common_prefix(ids, i, zeros, 0, npages - i)
                continue
            m = first_node[f]
            if m < 0:
                first_node[f] = n
                first_page[f] = i
                mine[i] = f
                i += 1
                continue
            # the pages from i on whose frames were first seen on the following pages of
            # node m all have this page's link: one union (or one failure) for the run
            j = first_page[f]
            run = _common_prefix(ids, i, firsts[m], j, min(npages - i, nodes[m].npages - j))
            link = (m, j - i)
            if link != last:
                if groups.union(m, j, n, i):
                    last = link
                else:
                    misaligned.update(filter(None, ids[i:i + run]))
            i += run
    del firsts  # 4 bytes per page: not kept past alignment
    node_at = {pid: array("i", [-1]) * len(images.vmas[pid]) for pid in images.pids}  # VMA index -> node
    for n, v in enumerate(nodes):
        node_at[v.pid][v.index] = n
    for n, v in enumerate(nodes):
        pp = parent[v.pid]
        if not pp:
            continue
        for pv in images.vmas[pp]:
            if pv.start == v.start and pv.end == v.end and pv.plannable:
                m = node_at[pp][pv.index]
                if groups.find(m)[0] != groups.find(n)[0]:
                    groups.union(m, 0, n, 0)
                break

    place = _Place(groups, len(nodes))  # node -> (group, pos of page 0)
    # a process whose two VMAs land on the same slots cannot keep them there
    for pid in images.pids:
        spans = sorted((place[node_at[pid][v.index]], v.npages, v.index) for v in images.vmas[pid] if v.plannable)
        for (pa, na, ia), (pb, nb, ib) in zip(spans, spans[1:]):
            if pa[0] == pb[0] and pb[1] < pa[1] + na:
                lo, hi = pb[1], min(pa[1] + na, pb[1] + nb)
                for v, p in ((images.vmas[pid][ia], pa[1]), (images.vmas[pid][ib], pb[1])):
                    if v.ids is not None:
                        misaligned.update(f for f in v.ids[lo - p:hi - p] if f)
    spans = None
    del groups  # the union-find: place has what the rest needs

    # 2. equal content at the slot the nearest ancestor holds (only classes of 2+ frames matter)
    canon = _merge_equal(images, nodes, place, node_at, cls, misaligned)
    del node_at, cls

    # 3. holders of every canonical frame: one list object per distinct holder set
    holders = _holders(nodes, canon, nframes, zeros)
    slot_of = _FrameSlot(place, first_node, first_page)

    relocated = {canon[f] for f in misaligned}
    while True:
        units = _units(images, nodes, canon, holders, slot_of, relocated)
        conflicts, schedule = _schedule(images, units)
        if not conflicts:
            break
        relocated.update(units.frame[u] for u in conflicts)
    del holders, slot_of, first_node, first_page, misaligned
    units.holders = None  # not needed by _draft
    return _draft(images, nodes, place, units, schedule, canon, relocated)


class _Place:
    """node -> (its group, the position of its page 0 in the group), in two arrays (a
    tuple per node costs a hundred bytes)."""

    __slots__ = ("group", "pos")

    def __init__(self, groups, nnodes):
        self.group = array("q", [0]) * nnodes
        self.pos = array("q", [0]) * nnodes
        for n in range(nnodes):
            self.group[n], self.pos[n] = groups.find(n)

    def __getitem__(self, n):
        return self.group[n], self.pos[n]


# A slot (a page of a group's range) is one int: group * SLOT_SPAN + position + SLOT_BIAS
# (a tuple per frame costs a hundred bytes); a relocated unit's slot is negative (_Units).
SLOT_SPAN, SLOT_BIAS = 1 << 32, 1 << 31


def _slot_place(slot):
    """(group, position) of an aligned slot."""
    g, pos = divmod(slot, SLOT_SPAN)
    return g, pos - SLOT_BIAS


class _FrameSlot:
    """frame -> its slot: where it was first seen (made on demand, not kept per frame)."""

    __slots__ = ("place", "first_node", "first_page")

    def __init__(self, place, first_node, first_page):
        self.place, self.first_node, self.first_page = place, first_node, first_page

    def __getitem__(self, c):
        n = self.first_node[c]
        return self.place.group[n] * SLOT_SPAN + self.place.pos[n] + self.first_page[c] + SLOT_BIAS


def _holders(nodes, canon, nframes, zeros):
    """canonical frame -> the pids holding it, in node order (None: nobody); equal holder
    lists are one object (_schedule groups units by it).  Each frame carries the id of its
    holder set so far; a VMA moves the sets of its frames on in runs of consecutive frame
    ids, by slice."""
    iota = array("I", range(nframes + 1))
    identity = canon == iota
    sets = [()]  # holder set id -> pids
    set_id = {(): 0}
    of = array("I", [0]) * (nframes + 1)  # canonical frame -> holder set id

    class Step(dict):
        """set id -> set id with pid added (looked up in C; made on first use)."""

        def __init__(self, pid):
            self.pid = pid

        def __missing__(self, h):
            pids = sets[h] + (self.pid,)
            got = self[h] = set_id.setdefault(pids, len(sets))
            if got == len(sets):
                sets.append(pids)
            return got

    steps = {}
    for v in nodes:
        if v.ids is None:
            continue
        step = steps.get(v.pid)
        if step is None:
            step = steps[v.pid] = Step(v.pid)
        cs = v.ids if identity else array("I", map(canon.__getitem__, v.ids))
        npages = len(cs)
        i = 0
        while i < npages:
            c = cs[i]
            if not c:
                i += 1 if i + 1 < npages and cs[i + 1] else _common_prefix(cs, i, zeros, 0, npages - i)
                continue
            run = _common_prefix(cs, i, iota, c, min(npages - i, nframes + 1 - c))
            if run == 1:
                of[c] = step[of[c]]
                i += 1
                continue
            old = of[c:c + run]
            h = old[0]
            if old.count(h) == run:
                of[c:c + run] = array("I", [step[h]]) * run
            else:
                of[c:c + run] = array("I", map(step.__getitem__, old))
            i += run
    lists = [None] + [list(pids) for pids in sets[1:]]
    return list(map(lists.__getitem__, of))


def _common_prefix(a, i, b, j, n):
    """How many of a[i:i+n] equal b[j:j+n] from the start (arrays): slice compares in C,
    growing while they match, then halving to the first difference."""
    head = min(n, 8)
    for k in range(head):  # short runs (pages alternating) end here, cheaply
        if a[i + k] != b[j + k]:
            return k
    done, step = head, 64
    while done < n:
        k = min(step, n - done)
        if a[i + done:i + done + k] == b[j + done:j + done + k]:
            done += k
            step = min(2 * step, 1 << 16)
            continue
        lo, hi = done, done + k  # a and b agree up to lo; they differ before hi
        while hi - lo > 8:
            mid = (lo + hi) // 2
            if a[i + lo:i + mid] == b[j + lo:j + mid]:
                lo = mid
            else:
                hi = mid
        while a[i + lo] == b[j + lo]:
            lo += 1
        return lo
    return n


def _merge_equal(images, nodes, place, node_at, cls, misaligned):
    """canon[f]: the frame whose physical page f's holders will share (f itself unless merged).

    A frame is merged into the frame with equal bytes that its process would inherit:
    the one the nearest ancestor holds at the same slot, or the one the parent holds at
    the same address in a VMA with the same bounds (what the reference tool shares).
    A merge across slots relocates the surviving frame (more pieces, same pages); it
    adds to ``misaligned``.  No process may end up holding one frame at two places.
    """
    nframes = images.nframes
    canon = array("I", range(nframes + 1))
    size = {}
    for f in range(1, nframes + 1):
        size[cls[f]] = size.get(cls[f], 0) + 1
    multi = bytearray(nframes + 1)
    for f in range(1, nframes + 1):
        if size[cls[f]] > 1:
            multi[f] = 1
    if not any(multi):
        return canon

    def resolve(f):
        while canon[f] != f:
            f = canon[f]
        return f

    holders = {}  # frame of a class of 2+ -> set of pids
    for v in nodes:
        if v.ids is not None:
            for f in compress(v.ids, map(multi.__getitem__, v.ids)):
                holders.setdefault(f, set()).add(v.pid)

    def merge(g, a, same_slot):
        if a == g or cls[a] != cls[g] or holders[a] & holders[g]:
            return g
        canon[g] = a
        holders[a] |= holders.pop(g)
        if not same_slot or g in misaligned or a in misaligned:
            misaligned.add(a)
        return a

    parent = images.parent
    view = {0: {}}
    left = {pid: len(images.children[pid]) for pid in images.pids}  # children not yet seen
    for pid in images.pids:
        inherited = view[parent[pid]]
        mine = dict(inherited)
        pp = parent[pid]
        parent_vmas = {(w.start, w.end): w for w in images.vmas[pp]} if pp else {}
        for v in images.vmas[pid]:
            if not v.plannable or v.ids is None:
                continue
            g0, p0 = place[node_at[pid][v.index]]
            w = parent_vmas.get((v.start, v.end))
            same_bounds = (w is not None and w.ids is not None and w.inheritable and v.inheritable
                           and w.body["kind"] == v.body["kind"] and w.body["path"] == v.body["path"]
                           and w.body["pgoff"] == v.body["pgoff"])
            ids = v.ids
            for i in compress(range(len(ids)), map(multi.__getitem__, ids)):
                f = ids[i]
                s = (g0, p0 + i)
                g = resolve(f)
                a = inherited.get(s)
                if a is not None:
                    g = merge(g, resolve(a), True)
                if same_bounds and multi[w.ids[i]]:
                    g = merge(g, resolve(w.ids[i]), False)
                mine[s] = g
        view[pid] = mine
        # a view is needed until the last child has taken its copy
        if not images.children[pid]:
            del view[pid]
        if pp:
            left[pp] -= 1
            if not left[pp]:
                del view[pp]
    for f in range(1, nframes + 1):
        canon[f] = resolve(f)
    return canon


class _Units:
    """Per unit: its frame, slot, creator (arrays: 20,000 one-page VMAs make as many units)
    and holders (one list object per distinct holder set).  A relocated unit's slot is
    -1 - k: its (unit, backing key) is xslots[k]."""

    def __init__(self):
        self.frame, self.slot, self.creator, self.holders = array("I"), array("q"), array("I"), []
        self.xslots = []
        self.of_relocated = {}  # (pid, canonical frame) -> unit

    def add(self, frame, slot, holders, creator):
        self.frame.append(frame)
        self.slot.append(slot)
        self.holders.append(holders)
        self.creator.append(creator)
        return len(self.frame) - 1


def _relocated_pages(ids, canon, relocated):
    """The pages of a frame map whose canonical frame is relocated (filtered in C)."""
    return compress(range(len(ids)), map(relocated.__contains__, map(canon.__getitem__, ids)))


def _relocation_keys(nodes, canon, relocated):
    """canonical relocated frame -> {key: [pids]}: one slot per backing (anon, or file page)."""
    keys = {}
    for v in nodes:
        if v.ids is None:
            continue
        for i in _relocated_pages(v.ids, canon, relocated):
            f = v.ids[i]
            key = ("file", v.body["path"], v.body["pgoff"] // PAGE + i) if v.is_file else ("anon",)
            keys.setdefault(canon[f], {}).setdefault(key, []).append(v.pid)
    return keys


def _units(images, nodes, canon, holders, slot_of, relocated):
    units = _Units()
    keys = _relocation_keys(nodes, canon, relocated) if relocated else {}
    lca_of = images.lca_of
    for c in range(1, images.nframes + 1):
        h = holders[c]
        if h is None:
            continue
        if c not in relocated:
            units.add(c, slot_of[c], h, h[0] if len(h) == 1 else lca_of(h))
            continue
        for key, pids in keys[c].items():
            u = units.add(c, -1 - len(units.xslots), pids, lca_of(pids))
            units.xslots.append((u, key))
            for pid in pids:
                units.of_relocated[(pid, c)] = u
    return units


def _schedule(images, units):
    """Per process: the order of writes and forks (ints: unit u to write, ~child to fork);
    the units that conflict."""
    got = _schedule_bundles(images, units)
    return got if got is not None else _schedule_slots(images, units)


class _Bundle:
    """The units of one (creator, holders) key, in unit order: they go into the same
    places (each holder's final slots, the fork edges from the creator down to them)."""

    __slots__ = ("creator", "holders", "units", "slots", "slot_set", "unit_at")

    def __init__(self, creator):
        self.creator = creator
        self.units, self.slots = [], []
        self.slot_set = self.unit_at = self.holders = None

    def inherited_at(self, written):
        """The units of this bundle whose slot is in ``written`` (in unit order)."""
        common = self.slot_set & written if len(written) < len(self.slot_set) else written & self.slot_set
        if not common:
            return []
        if self.unit_at is None:  # made when first needed: most bundles are never asked
            self.unit_at = dict(zip(self.slots, self.units))
        return sorted(map(self.unit_at.__getitem__, common))


def _schedule_bundles(images, units):
    """_schedule_slots's result without a dict entry per held page and place: units are
    kept in bundles.  Valid when no two units meet at one slot in any dict
    _schedule_slots would build (each holder's final slots, each fork edge); else None."""
    parent = images.parent
    bundles = {}
    for u, s, top, holders in zip(range(len(units.frame)), units.slot, units.creator, units.holders):
        key = (top, id(holders))
        b = bundles.get(key)
        if b is None:
            b = bundles[key] = _Bundle(top)
            b.holders = holders
        b.units.append(u)
        b.slots.append(s)
    final = {pid: [] for pid in images.pids}  # pid -> bundles it holds
    need = {pid: {} for pid in images.pids}  # pid -> {child: bundles the fork of child needs}
    own = {}  # creator -> its bundles
    for b in bundles.values():
        b.slot_set = frozenset(b.slots)
        if len(b.slot_set) != len(b.slots):
            return None
        seen = set()
        for h in b.holders:
            final[h].append(b)
            c = h
            while c != b.creator and c not in seen:
                seen.add(c)
                need[parent[c]].setdefault(c, []).append(b)
                c = parent[c]
        own.setdefault(b.creator, []).append(b)
    for group in [*final.values(), *(e for edges in need.values() for e in edges.values())]:
        if len(group) > 1 and not _disjoint(group):
            return None
    conflicts = set()
    schedule = {}
    for pid in images.pids:
        kids = images.children[pid]
        contested = _contested(own.get(pid, ()))
        best = _fewest_conflicts(
            kids, lambda order: _greedy_bundles(pid, order, need[pid], final[pid], contested),
            lambda: _other_orders_bundles(pid, kids, need[pid], final[pid]))
        conflicts.update(best[0])
        schedule[pid] = best[1]
    return conflicts, schedule


def _disjoint(group):
    """Do the bundles of group have pairwise disjoint slots?  (Cost: all but the largest.)"""
    big = max(group, key=lambda b: len(b.slots))
    rest = set()
    n = 0
    for b in group:
        if b is not big:
            rest.update(b.slot_set)
            n += len(b.slots)
    return len(rest) == n and rest.isdisjoint(big.slot_set)


def _contested(bundles):
    """Slots where a creator writes more than one unit (say an old version before a fork
    and its own after it)."""
    seen, contested = set(), set()
    for b in bundles:
        contested |= b.slot_set & seen
        seen |= b.slot_set
    return contested


def _greedy_bundles(pid, order, need, final, contested):
    """_greedy over bundles.  An own bundle without contested slots is written whole,
    in unit order, before the first fork that needs it; units at contested slots are
    followed one by one (which one the slot holds now); an inherited unit at a slot this
    process has written conflicts."""
    written = set()  # slots written so far
    whole = set()  # ids of own bundles whose units are all in place
    cur = {}  # contested slot -> the unit it holds now
    holder_of = {}  # unit at a contested slot -> id of its bundle
    done = set()  # units written (in bundles with contested slots)
    conflicts, seq = [], []

    def provide(bundles):
        writes = []
        for b in bundles:
            if b.creator != pid or id(b) in whole:
                continue
            if contested.isdisjoint(b.slot_set):
                writes.extend(b.units)
                written.update(b.slot_set)
                whole.add(id(b))
                continue
            intact = True
            for u, s in zip(b.units, b.slots):
                if s in contested:
                    if cur.get(s) == u:
                        continue
                    if u in done:
                        conflicts.append(u)
                        intact = False
                        continue
                    was = cur.get(s)
                    if was is not None:
                        whole.discard(holder_of[was])
                    cur[s] = u
                    holder_of[u] = id(b)
                elif u in done:
                    continue
                done.add(u)
                writes.append(u)
                written.add(s)
            if intact:
                whole.add(id(b))
        if writes:
            writes.sort()
            seq.extend(writes)
        if written:
            for b in bundles:
                if b.creator != pid:
                    conflicts.extend(b.inherited_at(written))

    for c in order:
        provide(need.get(c, ()))
        seq.append(~c)
    provide(final)
    return conflicts, seq


def _other_orders_bundles(pid, kids, need, final):
    """_other_orders over bundles."""
    writes_here = set()
    for bundles in [*need.values(), final]:
        for b in bundles:
            if b.creator == pid:
                writes_here.update(b.slot_set)
    early = {c: -sum(len(b.inherited_at(writes_here)) for b in need.get(c, ()) if b.creator != pid)
             for c in kids}
    return [sorted(kids, key=lambda c: early[c]), kids[::-1]]


def _schedule_slots(images, units):
    """Per process: the order of writes and forks; the units that conflict (one dict entry
    per unit and place: the general case)."""
    parent = images.parent
    final = {pid: {} for pid in images.pids}
    need = {pid: {} for pid in images.pids}
    conflicts = set()
    edges_of = {}  # (creator, holders) -> the dicts its units go into: holders' finals, fork edges
    setdefault = dict.setdefault
    for u, s, top, holders in zip(range(len(units.frame)), units.slot, units.creator, units.holders):
        key = (top, id(holders))  # equal holder lists are one object (see plan_exact)
        dicts = edges_of.get(key)
        if dicts is None:
            # many units share holders: remember the dicts they go into (each holder's
            # final slots, and every fork edge from the creator down to a holder)
            dicts, seen = [final[h] for h in holders], set()
            for h in holders:
                c = h
                while c != top and c not in seen:
                    seen.add(c)
                    dicts.append(need[parent[c]].setdefault(c, {}))
                    c = parent[c]
            edges_of[key] = dicts
        # setdefault in C over all dicts: the first unit at a slot stays, a different one conflicts
        got = list(map(setdefault, dicts, repeat(s), repeat(u)))
        if got.count(u) != len(got):
            conflicts.add(u)
    schedule = {}
    creator = units.creator
    for pid in images.pids:
        kids = images.children[pid]
        best = _fewest_conflicts(kids, lambda order: _greedy(pid, order, need[pid], final[pid], creator),
                                 lambda: _other_orders(pid, kids, need[pid], final[pid], creator))
        conflicts.update(best[0])
        schedule[pid] = best[1]
    return conflicts, schedule


def _fewest_conflicts(kids, attempt, other_orders):
    """attempt(order) -> (conflicts, schedule) of one fork order of a process's children: the
    dumped order first, then other_orders() until one has no conflict; the attempt with the
    fewest conflicts (the first of equals).  Both schedulers choose their order this way."""
    best = attempt(kids)
    if best[0] and len(kids) > 1:
        for order in other_orders():
            got = attempt(order)
            if len(got[0]) < len(best[0]):
                best = got
            if not got[0]:
                break
    return best


def _other_orders(pid, kids, need, final, creator):
    """Fork orders to try when the dumped one conflicts."""
    # children that need an inherited version at a slot this process writes go first
    writes_here = {s for reqs in list(need.values()) + [final] for s, u in reqs.items() if creator[u] == pid}
    early = {c: -sum(1 for s, u in need.get(c, {}).items() if creator[u] != pid and s in writes_here)
             for c in kids}
    return [sorted(kids, key=lambda c: early[c]), kids[::-1]]


def _greedy(pid, order, need, final, creator):
    cur, done, conflicts, seq = {}, set(), [], []

    def provide(reqs):
        # a unit already in place needs nothing: skip those in one pass (cur only holds own units)
        if reqs.items() <= cur.items():
            return  # every version this child needs is in place (the common case), checked in C
        cur_get = cur.get
        for s, u in [(s, u) for s, u in reqs.items() if cur_get(s) != u]:
            if creator[u] == pid:
                if cur.get(s) == u:
                    continue
                if u in done:
                    conflicts.append(u)
                    continue
                cur[s] = u
                done.add(u)
                seq.append(u)
            elif s in cur:
                conflicts.append(u)

    for c in order:
        provide(need.get(c, {}))
        seq.append(~c)
    provide(final)
    return conflicts, seq


def _draft(images, nodes, place, units, schedule, canon, relocated):
    draft = Draft(images)
    # group ranges, created by the LCA of the processes holding the group's VMAs; per group
    # (by its root node): extent lo..hi, that LCA, the first node (arrays, not a list each)
    nnodes = len(nodes)
    ext_lo, ext_hi, ext_top = (array("q", [0]) * nnodes for _ in range(3))
    ext_node = array("q", [-1]) * nnodes
    for n, v in enumerate(nodes):
        g, p = place[n]
        if ext_node[g] < 0:
            ext_node[g], ext_lo[g], ext_hi[g], ext_top[g] = n, p, p + v.npages, v.pid
            continue
        ext_lo[g] = min(ext_lo[g], p)
        ext_hi[g] = max(ext_hi[g], p + v.npages)
        if ext_top[g] != v.pid:
            ext_top[g] = images.lca(ext_top[g], v.pid)
    # ranges are numbered in creator order so the plan reads top-down: sort keys
    # (creator's order, 0 = group | 1 = extra unit, group or unit) packed into one int
    order = images.order
    group_rid = array("q", [0]) * nnodes  # group -> its range
    group_lo = array("q", [0]) * nnodes  # group -> the group position of the range's page 0
    extra_rid = {}
    todo = [(order[ext_top[g]] << 34) | g for g in range(nnodes) if ext_node[g] >= 0]
    for u in range(len(units.frame)):
        if units.slot[u] < 0:
            todo.append((order[units.creator[u]] << 34) | (1 << 33) | u)
    todo.sort()
    slot_page = {}
    for key in todo:
        kind, x = key >> 33 & 1, key & ((1 << 33) - 1)
        if kind == 0:
            lo, hi, n = ext_lo[x], ext_hi[x], ext_node[x]
            v, p0 = nodes[n], place.pos[n]
            pgoff = v.body["pgoff"] + (lo - p0) * PAGE if v.is_file else 0
            group_rid[x] = draft.new_range(ext_top[x], hi - lo, v, pgoff)
            group_lo[x] = lo
        else:
            u = x
            creator = units.creator[u]
            backing = units.xslots[-1 - units.slot[u]][1]
            if backing[0] == "file":
                rid = draft.new_range(creator, 1, _FileLike(backing[1]), backing[2] * PAGE)
                slot_page[u] = (rid, 0)
            else:
                r = extra_rid.get(creator)
                if r is None:
                    r = extra_rid[creator] = draft.new_range(creator, 0)
                slot_page[u] = (r, draft.ranges[r].npages)
                draft.ranges[r].npages += 1

    def where(slot):
        if slot < 0:
            return slot_page[units.xslots[-1 - slot][0]]
        g, pos = _slot_place(slot)
        return group_rid[g], pos - group_lo[g]

    for pid in images.pids:
        for x in schedule.pop(pid):
            if x < 0:
                draft.fork(pid, ~x)
            else:
                rid, page = where(units.slot[x])
                draft.write(pid, rid, page, units.frame[x])
    for n, v in enumerate(nodes):
        g, p = place[n]
        rid, lo = group_rid[g], group_lo[g]
        # an aligned frame's slot is its own page's slot: only relocated frames move elsewhere
        pieces = (rid, p - lo, v.npages, 0)  # flat (layout.flat)
        if relocated and v.ids is not None:
            src = None
            for i in _relocated_pages(v.ids, canon, relocated):
                if src is None:
                    src = expand(pieces)
                u = units.of_relocated[(v.pid, canon[v.ids[i]])]
                src[i] = where(units.slot[u])
            if src is not None:
                pieces = flat(pieces_of(src))
        draft.sources[v.pid][v.index] = pieces
    return draft


class _FileLike:
    """Stands in for a file VMA when a relocated frame gets a one-page file range."""

    is_file = True

    def __init__(self, path):
        self.body = {"path": path, "dev": None, "ino": 0}
