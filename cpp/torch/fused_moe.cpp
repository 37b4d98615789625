// epmoe::fused_moe_forward: the MoE layer's one-process inference forward from its router logits as one op —
// routing (epmoe::route), the "hash" replica choice (epmoe::replica_hash), the load count (epmoe::count_slots) and
// the routed plus shared experts (epmoe::fused_experts_forward). The same ops, called in the same order as the
// layer's general path, so the results are the same bit for bit; at decode the layer otherwise spends a large part
// of its own time crossing from Python into four ops (argument conversion, dispatch, the routing op's autograd
// layer). Inputs of any strides; x is converted to w13's dtype, bias to float32 (as the layer does). Every device.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace epmoe {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor fused_moe_forward(const at::Tensor& x, const at::Tensor& router_logits, int64_t top_k,
                             c10::string_view scoring, int64_t num_groups, int64_t topk_groups, const OptTensor& bias,
                             bool renormalize, double scaling_factor, const at::Tensor& log2phy,
                             const at::Tensor& logcnt, int64_t token_offset, int64_t layer, const at::Tensor& w13,
                             const at::Tensor& w2, const OptTensor& load_counts, const OptTensor& shared_gate,
                             const OptTensor& shared_up, const OptTensor& shared_down) {
    static const auto route =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("epmoe::route", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view, int64_t, int64_t,
                                                      const OptTensor&, bool, double)>();
    static const auto replica_hash =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("epmoe::replica_hash", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
    static const auto count_slots = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("epmoe::count_slots", "")
                                        .typed<void(at::Tensor&, const at::Tensor&)>();
    static const auto experts =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("epmoe::fused_experts_forward", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&)>();
    // No autograd here (the schema's callers run with grad mode off): the routing op's autograd kernel is skipped.
    const at::AutoDispatchBelowAutograd below_autograd;
    const auto contiguous = [](const OptTensor& t) -> OptTensor {
        return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
    };
    const OptTensor bias_f32 = bias.has_value() ? OptTensor(bias->to(at::kFloat).contiguous()) : std::nullopt;
    const auto [topk_weights, topk_idx] = route.call(router_logits.contiguous(), top_k, scoring, num_groups,
                                                     topk_groups, bias_f32, renormalize, scaling_factor);
    const at::Tensor slot_idx =
        replica_hash.call(topk_idx, log2phy.contiguous(), logcnt.contiguous(), token_offset, layer);
    if (load_counts.has_value()) {
        at::Tensor counts = *load_counts;
        count_slots.call(counts, slot_idx);
    }
    return experts.call(x.to(w13.scalar_type()).contiguous(), slot_idx, topk_weights, w13.contiguous(),
                        w2.contiguous(), std::nullopt, contiguous(shared_gate), contiguous(shared_up),
                        contiguous(shared_down));
}

}  // namespace
}  // namespace epmoe

TORCH_LIBRARY_FRAGMENT(epmoe, m) {
    // out [T, H] in w13's dtype = fused_experts_forward(x, slot_idx, topk_weights, w13, w2, shared...), where
    // (topk_weights, topk_idx) = route(router_logits, ...), slot_idx = replica_hash(topk_idx, log2phy, logcnt,
    // token_offset, layer), and load_counts int64 [P] (if given) += the count of each slot in slot_idx. No autograd.
    m.def(
        "fused_moe_forward(Tensor x, Tensor router_logits, int top_k, str scoring, int num_groups, int topk_groups, "
        "Tensor? bias, bool renormalize, float scaling_factor, Tensor log2phy, Tensor logcnt, int token_offset, "
        "int layer, Tensor w13, Tensor w2, Tensor(a!)? load_counts=None, Tensor? shared_gate=None, "
        "Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(epmoe, CompositeExplicitAutograd, m) {
    m.impl("fused_moe_forward", &epmoe::fused_moe_forward);
}
