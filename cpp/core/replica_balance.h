// Replica choice "balanced": per-batch min-max assignment of each expert's (token, slot) pairs to its replicas.
// Torch-free; the quota solver is host/device code shared by the CPU ops (cpp/torch) and the CUDA kernel (cuda/).
//
// Problem (one layer): expert e has c_e pairs and replicas on slots log2phy[e, 0..logcnt[e]); slot p lives on rank
// p / slots_per_rank. Choose integer quotas q[e, i] >= 0 with sum_i q[e, i] = c_e minimising the largest rank load
// sum of q over the rank's slots. Experts whose replicas all sit on one rank are fixed (their pairs form the rank's
// base load B_r). The rest is a bipartite flow: source -> expert (capacity c_e), expert -> the rank of each replica
// (unbounded), rank -> sink (capacity M - B_r). M is feasible iff the max flow saturates the experts.
//
// Solver (parametric max flow, Newton on the cut): start at a lower bound M of the optimum; run Dinic; if the flow
// is short, the nodes reachable from the source form a cut (experts X, their holder ranks N(X), which must carry
// sum_X c_e + sum_N B_r), so ceil of that over |N(X)| > M is a better lower bound: raise every rank capacity to it
// and continue augmenting from the current flow (capacities only grow). The first saturating M is the optimum: an
// exact min-max assignment, not an approximation. Every step is integer arithmetic in a fixed order, so the CPU and
// the CUDA kernel give bitwise equal quotas, identical on every rank that sees the same counts.
#pragma once

#include <cstddef>
#include <cstdint>

// Host and device, always inlined (the CUDA solver must not spill its state to local memory).
#include "cpp/core/host_device.h"

namespace epmoe::core {

// Sizes of one layer's problem.
struct BalanceShape {
    int num_experts = 0;      // E
    int max_replicas = 0;     // M: row width of log2phy
    int num_ranks = 0;        // R
    int64_t num_slots = 0;    // P, a multiple of R
};

// Scratch of the solver, carved from one buffer of balance_scratch_bytes(shape) bytes (8-byte aligned).
// Nodes: 0 source, 1 sink, 2 + r rank r, then one node per flexible expert (k-th: 2 + R + k). Edges come in pairs
// (e, e ^ 1 = its reverse).
struct BalanceScratch {
    int64_t* base;          // [R] pairs of fixed experts per rank
    int64_t* cap;           // [2 * num_edges] residual capacities
    int32_t* to;            // [2 * num_edges]
    int32_t* next;          // [2 * num_edges] next edge out of the same node, -1 = end
    int32_t* head;          // [V] first edge out of each node
    int32_t* level;         // [V] BFS level, -1 = unreached
    int32_t* arc;           // [V] current arc of the blocking-flow search
    int32_t* queue;         // [V] BFS queue, then the edge path of the search
    int32_t* flexible;      // [E] expert of each flexible-expert node
    int32_t* replica_edge;  // [E * M] flow edge of each replica of a flexible expert (entries < logcnt)
    int32_t* rank_edge;     // [R] edge rank -> sink
    int32_t* rank_of_slot;  // [P]
};

EPMOE_HD int64_t balance_num_edges(const BalanceShape& s) {
    return static_cast<int64_t>(s.num_experts) + s.num_slots + s.num_ranks;
}

EPMOE_HD int64_t balance_num_nodes(const BalanceShape& s) {
    return 2 + static_cast<int64_t>(s.num_ranks) + s.num_experts;
}

EPMOE_HD size_t balance_scratch_bytes(const BalanceShape& s) {
    const size_t edges = 2 * static_cast<size_t>(balance_num_edges(s));
    const size_t nodes = static_cast<size_t>(balance_num_nodes(s));
    const size_t words64 = static_cast<size_t>(s.num_ranks) + edges;
    const size_t words32 = 2 * edges + 4 * nodes + static_cast<size_t>(s.num_experts) * (1 + s.max_replicas) +
                           s.num_ranks + static_cast<size_t>(s.num_slots);
    return 8 * words64 + 4 * words32 + 8;
}

EPMOE_HD BalanceScratch balance_scratch_carve(void* buffer, const BalanceShape& s) {
    const int64_t edges = 2 * balance_num_edges(s);
    const int64_t nodes = balance_num_nodes(s);
    BalanceScratch w;
    auto* p64 = static_cast<int64_t*>(buffer);
    w.base = p64;
    w.cap = w.base + s.num_ranks;
    auto* p32 = reinterpret_cast<int32_t*>(w.cap + edges);
    w.to = p32;
    w.next = w.to + edges;
    w.head = w.next + edges;
    w.level = w.head + nodes;
    w.arc = w.level + nodes;
    w.queue = w.arc + nodes;
    w.flexible = w.queue + nodes;
    w.replica_edge = w.flexible + s.num_experts;
    w.rank_edge = w.replica_edge + static_cast<int64_t>(s.num_experts) * s.max_replicas;
    w.rank_of_slot = w.rank_edge + s.num_ranks;
    return w;
}

namespace balance_detail {

constexpr int64_t kUnbounded = int64_t{1} << 62;

EPMOE_HD int32_t add_edge(BalanceScratch& w, int32_t& num_edges, int32_t from, int32_t to, int64_t cap) {
    const int32_t e = num_edges;
    w.to[e] = to;
    w.cap[e] = cap;
    w.next[e] = w.head[from];
    w.head[from] = e;
    w.to[e + 1] = from;
    w.cap[e + 1] = 0;
    w.next[e + 1] = w.head[to];
    w.head[to] = e + 1;
    num_edges += 2;
    return e;
}

// BFS levels from the source over residual edges; true when the sink is reached.
EPMOE_HD bool bfs(BalanceScratch& w, int32_t num_nodes) {
    for (int32_t v = 0; v < num_nodes; ++v) w.level[v] = -1;
    int32_t begin = 0, end = 0;
    w.level[0] = 0;
    w.queue[end++] = 0;
    while (begin < end) {
        const int32_t v = w.queue[begin++];
        // Nodes at or beyond the sink's level lie on no shortest path (levels grow along the queue).
        if (w.level[1] >= 0 && w.level[v] >= w.level[1]) break;
        for (int32_t e = w.head[v]; e >= 0; e = w.next[e]) {
            const int32_t u = w.to[e];
            if (w.cap[e] > 0 && w.level[u] < 0) {
                w.level[u] = w.level[v] + 1;
                w.queue[end++] = u;
            }
        }
    }
    return w.level[1] >= 0;
}

// One blocking flow on the level graph (Dinic), iterative: the path of edges lives in w.queue.
EPMOE_HD int64_t blocking_flow(BalanceScratch& w, int32_t num_nodes) {
    for (int32_t v = 0; v < num_nodes; ++v) w.arc[v] = w.head[v];
    int32_t* path = w.queue;
    int32_t depth = 0;
    int32_t v = 0;
    int64_t total = 0;
    while (true) {
        if (v == 1) {
            int64_t push = kUnbounded;
            for (int32_t i = 0; i < depth; ++i) push = w.cap[path[i]] < push ? w.cap[path[i]] : push;
            // Retreat to the tail of the first saturated edge.
            int32_t keep = depth;
            for (int32_t i = 0; i < depth; ++i) {
                w.cap[path[i]] -= push;
                w.cap[path[i] ^ 1] += push;
                if (w.cap[path[i]] == 0 && keep == depth) keep = i;
            }
            total += push;
            depth = keep;
            v = depth == 0 ? 0 : w.to[path[depth - 1]];
            continue;
        }
        int32_t e = w.arc[v];
        while (e >= 0 && !(w.cap[e] > 0 && w.level[w.to[e]] == w.level[v] + 1)) e = w.next[e];
        w.arc[v] = e;
        if (e >= 0) {
            path[depth++] = e;
            v = w.to[e];
            continue;
        }
        if (depth == 0) return total;
        w.level[v] = -1;  // dead end for the rest of this phase
        const int32_t back = path[--depth];
        v = w.to[back ^ 1];
        w.arc[v] = w.next[w.arc[v]];
    }
}

EPMOE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace balance_detail

// Optimal quotas of one layer.
//   counts   [E] int64 >= 0 pairs per expert (over every rank of the group)
//   log2phy  [E, M] int64 slots of each expert, ascending, -1 padded; logcnt [E] int64 in [1, M]
//   quota    [E, M] int64 (out): pairs per replica for the first logcnt[e] entries of each row (the padding is not
//            written); a row sums to counts[e]
// Fixed experts split their pairs evenly over their replicas (the first replicas take the remainder).
// Returns the largest rank load, which is the optimum. Inputs must be valid (the callers check them).
EPMOE_HD int64_t balance_quotas(const BalanceShape& s, const int64_t* counts, const int64_t* log2phy,
                                const int64_t* logcnt, BalanceScratch w, int64_t* quota) {
    using namespace balance_detail;
    const int num_experts = s.num_experts, width = s.max_replicas, num_ranks = s.num_ranks;
    const int32_t slots_per_rank = static_cast<int32_t>(s.num_slots / num_ranks);
    // Rank of every slot, without a division per lookup.
    for (int32_t r = 0, p = 0; r < num_ranks; ++r)
        for (int32_t j = 0; j < slots_per_rank; ++j) w.rank_of_slot[p++] = r;
    for (int r = 0; r < num_ranks; ++r) w.base[r] = 0;
    // ---- fixed experts (every replica on one rank: slots ascend, so first and last rank agree) -> base loads
    int64_t total = 0, flexible_pairs = 0;
    int32_t num_flexible = 0;
    for (int e = 0; e < num_experts; ++e) {
        const int64_t c = counts[e];
        const int32_t n = static_cast<int32_t>(logcnt[e]);
        const int64_t* slots = log2phy + static_cast<int64_t>(e) * width;
        int64_t* q = quota + static_cast<int64_t>(e) * width;
        total += c;
        const int32_t rank = w.rank_of_slot[slots[0]];
        if (c > 0 && w.rank_of_slot[slots[n - 1]] != rank) {
            flexible_pairs += c;
            w.flexible[num_flexible++] = e;
        } else if (n == 1) {
            q[0] = c;
            w.base[rank] += c;
        } else {
            for (int32_t i = 0; i < n; ++i) q[i] = c / n + (i < c % n ? 1 : 0);
            w.base[rank] += c;
        }
    }
    int64_t peak = 0;
    for (int r = 0; r < num_ranks; ++r) peak = w.base[r] > peak ? w.base[r] : peak;
    if (num_flexible == 0) return peak;
    // ---- lower bound: the mean, the largest base load, and each flexible expert with its holders' base loads
    int64_t bound = ceil_div(total, num_ranks);
    bound = peak > bound ? peak : bound;
    for (int32_t k = 0; k < num_flexible; ++k) {
        const int e = w.flexible[k];
        const int32_t n = static_cast<int32_t>(logcnt[e]);
        const int64_t* slots = log2phy + static_cast<int64_t>(e) * width;
        int64_t held = counts[e], holders = 0;
        for (int32_t i = 0; i < n; ++i) {
            const int32_t r = w.rank_of_slot[slots[i]];
            if (i == 0 || r != w.rank_of_slot[slots[i - 1]]) {  // a rank's replicas are adjacent
                held += w.base[r];
                ++holders;
            }
        }
        const int64_t b = ceil_div(held, holders);
        bound = b > bound ? b : bound;
    }
    // ---- flow network at M = bound, warm-started with each expert's pairs sent straight to its holders' spare
    // capacity (an even part each first, then whatever fits)
    const int32_t num_nodes = 2 + num_ranks + num_flexible;
    for (int32_t v = 0; v < num_nodes; ++v) w.head[v] = -1;
    int32_t num_edges = 0;
    for (int r = 0; r < num_ranks; ++r) w.rank_edge[r] = add_edge(w, num_edges, 2 + r, 1, bound - w.base[r]);
    int64_t flow = 0;
    for (int32_t k = 0; k < num_flexible; ++k) {
        const int e = w.flexible[k];
        const int32_t n = static_cast<int32_t>(logcnt[e]);
        const int64_t* slots = log2phy + static_cast<int64_t>(e) * width;
        int32_t* edge = w.replica_edge + static_cast<int64_t>(e) * width;
        const int32_t node = 2 + num_ranks + k;
        const int32_t source_edge = add_edge(w, num_edges, 0, node, counts[e]);
        for (int32_t i = 0; i < n; ++i)
            edge[i] = add_edge(w, num_edges, node, 2 + w.rank_of_slot[slots[i]], kUnbounded);
        int64_t left = counts[e];
        for (int pass = 0; pass < 2 && left > 0; ++pass) {
            const int64_t part = pass == 0 ? ceil_div(left, n) : left;
            for (int32_t i = 0; i < n && left > 0; ++i) {
                const int32_t re = w.rank_edge[w.rank_of_slot[slots[i]]];
                int64_t push = part < left ? part : left;
                push = push < w.cap[re] ? push : w.cap[re];
                if (push <= 0) continue;
                w.cap[edge[i]] -= push;
                w.cap[edge[i] ^ 1] += push;
                w.cap[re] -= push;
                w.cap[re ^ 1] += push;
                left -= push;
            }
        }
        w.cap[source_edge] = left;
        w.cap[source_edge ^ 1] = counts[e] - left;
        flow += counts[e] - left;
    }
    // ---- Newton on the cut until the experts are saturated
    while (true) {
        while (flow < flexible_pairs && bfs(w, num_nodes)) flow += blocking_flow(w, num_nodes);
        if (flow == flexible_pairs) break;
        // The last BFS marked what the source reaches: experts X and exactly their holder ranks N(X).
        int64_t need = 0, holders = 0;
        for (int r = 0; r < num_ranks; ++r)
            if (w.level[2 + r] >= 0) {
                need += w.base[r];
                ++holders;
            }
        for (int32_t k = 0; k < num_flexible; ++k)
            if (w.level[2 + num_ranks + k] >= 0) need += counts[w.flexible[k]];
        int64_t next = holders > 0 ? ceil_div(need, holders) : bound + 1;
        next = next > bound ? next : bound + 1;  // a short flow proves next > bound; keep progress regardless
        for (int r = 0; r < num_ranks; ++r) w.cap[w.rank_edge[r]] += next - bound;
        bound = next;
    }
    for (int32_t k = 0; k < num_flexible; ++k) {
        const int64_t row = static_cast<int64_t>(w.flexible[k]) * width;
        for (int32_t i = 0; i < logcnt[w.flexible[k]]; ++i) quota[row + i] = w.cap[w.replica_edge[row + i] ^ 1];
    }
    peak = 0;
    for (int r = 0; r < num_ranks; ++r) {
        const int64_t load = bound - w.cap[w.rank_edge[r]];
        peak = load > peak ? load : peak;
    }
    return peak;
}

}  // namespace epmoe::core

namespace epmoe::core {

// counts[e] += pairs of expert e among topk_idx[0, n). Returns the flat index of the first id outside [-1, E), or
// -1 when every id is valid (the valid ids before it are counted).
template <typename Idx>
int64_t balance_count(const Idx* topk_idx, int64_t n, int num_experts, int64_t* counts);

// Replica of every pair, given the layer's quotas: the g-th pair of expert e over the group (g = prefix[e] + the
// pair's rank among this call's pairs of e in flat order) goes to the replica i with cum[i - 1] <= g < cum[i],
// cum = the running sum of quota[e, :]. A g beyond counts[e] stays on the last replica.
//   topk_idx  [n] logical ids, -1 = skipped (stays -1); ids must be valid
//   prefix    [E] int64 pairs of lower ranks, or nullptr (0)
//   scratch   [3 * E] int64
//   slot_idx  [n] (out) physical slot ids
template <typename Idx>
void balance_assign(const Idx* topk_idx, int64_t n, const BalanceShape& s, const int64_t* log2phy,
                    const int64_t* logcnt, const int64_t* quota, const int64_t* prefix, int64_t* scratch,
                    Idx* slot_idx);

// Plan-time replica shares of one layer ("weighted" policy): the fraction of each expert's load given to each
// replica, so that the predicted rank loads are as even as the replicas allow. The largest rank load is the exact
// fractional optimum (balance_quotas on the load scaled to 2^40 pairs); then `num_sweeps` rounds of water-filling
// (each expert's load re-spread over its holder ranks, the others fixed) even out the other ranks without raising
// the largest (each round lowers the sum of squared rank loads).
//   load   [E] float64 >= 0; share [E, M] float64 (out): rows sum to 1 over logcnt entries (the even split where
//   the load is 0), 0 on padding. Inputs must be valid.
void replica_shares(const BalanceShape& s, const double* load, const int64_t* log2phy, const int64_t* logcnt,
                    int num_sweeps, double* share);

}  // namespace epmoe::core
