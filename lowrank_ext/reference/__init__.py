"""Pure-PyTorch references of every op, keyed by the op's qualified name.

References accumulate in fp32 (or fp64) and never import lowrank_ext._C: tests compare
the kernels against them, benchmarks time them as the baseline.
"""
from __future__ import annotations

from typing import Callable

from .galore import galore_apply_ref, galore_project_ref
from .lora import lora_backward_ref, lora_dropout_mask_ref, lora_forward_ref, lora_merge_ref
from .monarch import (blockdiag_backward_ref, blockdiag_forward_ref, blockdiag_ref, monarch_backward_ref,
                      monarch_dense_ref, monarch_forward_ref, monarch_ref)
from .multilora import (lora_expand_inplace_ref, lora_expand_ref, lora_grouped_outer_ref, lora_shrink_ref,
                        multi_lora_linear_ref)
from .optim import adamw_step_fp32_ref, adamw_step_quantized_ref, adamw_step_rank1_ref
from .sparse import sddmm_ref, sparse_scatter_add_ref
from .svd import batched_rsvd_ref, gaussian_sketch_ref, jacobi_svd_ref, rsvd_ref, sketch_matrix_ref, svd_update_ref
from .quant import dequantize_blockwise_ref, quantize_blockwise_ref

REFERENCES: dict[str, Callable] = {
    "lowrank::quantize_blockwise": quantize_blockwise_ref,
    "lowrank::dequantize_blockwise": dequantize_blockwise_ref,
    "lowrank::adamw_step_quantized_": adamw_step_quantized_ref,
    "lowrank::adamw_step_rank1_": adamw_step_rank1_ref,
    "lowrank::adamw_step_fp32_": adamw_step_fp32_ref,
    "lowrank::lora_forward": lora_forward_ref,
    "lowrank::lora_backward": lora_backward_ref,
    "lowrank::lora_merge_": lora_merge_ref,
    "lowrank::lora_shrink": lora_shrink_ref,
    "lowrank::lora_expand_": lora_expand_inplace_ref,
    "lowrank::lora_expand": lora_expand_ref,
    "lowrank::lora_grouped_outer": lora_grouped_outer_ref,
    "lowrank::monarch_forward": monarch_forward_ref,
    "lowrank::monarch_backward": monarch_backward_ref,
    "lowrank::blockdiag_forward": blockdiag_forward_ref,
    "lowrank::blockdiag_backward": blockdiag_backward_ref,
    "lowrank::sparse_scatter_add_": sparse_scatter_add_ref,
    "lowrank::sddmm": sddmm_ref,
    "lowrank::gaussian_sketch": gaussian_sketch_ref,
    "lowrank::jacobi_svd": jacobi_svd_ref,
    "lowrank::rsvd": rsvd_ref,
    "lowrank::batched_rsvd": batched_rsvd_ref,
    "lowrank::svd_update": svd_update_ref,
    "lowrank::galore_project": galore_project_ref,
    "lowrank::galore_apply_": galore_apply_ref,
}

__all__ = ["REFERENCES", "quantize_blockwise_ref", "dequantize_blockwise_ref", "adamw_step_quantized_ref",
           "adamw_step_rank1_ref", "adamw_step_fp32_ref", "lora_forward_ref", "lora_backward_ref", "lora_merge_ref", "lora_dropout_mask_ref",
           "lora_shrink_ref", "lora_expand_ref", "lora_expand_inplace_ref", "lora_grouped_outer_ref",
           "multi_lora_linear_ref",
           "monarch_ref", "monarch_forward_ref", "monarch_backward_ref", "monarch_dense_ref", "blockdiag_ref",
           "blockdiag_forward_ref", "blockdiag_backward_ref", "sparse_scatter_add_ref", "sddmm_ref",
           "gaussian_sketch_ref", "galore_project_ref", "galore_apply_ref", "sketch_matrix_ref", "jacobi_svd_ref",
           "rsvd_ref", "batched_rsvd_ref", "svd_update_ref"]
