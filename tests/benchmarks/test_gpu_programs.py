"""`benchmarks/gpu_programs.py` reads XLA's thunk sequence as it is laid out (a while's `condition:` at the while's
own indentation, command buffers holding kernels, conditionals' branches) and counts a step's kernels right. The
compile itself needs JAX's CUDA plugin, which the test environment does not install."""

import pytest

from benchmarks import gpu_programs

# The layout of a `*.thunk_sequence_after_thunk_passes.txt` of XLA (JAX 0.10.2 / 0.11.2), shortened: a prefill in
# a command buffer, a decoding loop whose body is a command buffer with a conditional of two branches, then outputs.
THUNKS = """\
000: kCommandBuffer [source       | next=004 (1) ]
    001: kCustomKernel [source        | next=002 (1)] input_concatenate_fusion grid: [64, 1, 1] threads: [128, 1, 1]
    002: kCustomKernel [prev=001 (1)  | next=003 (1)] dvl_flash_forward grid: [1, 2, 16] threads: [256, 1, 1]
    003: kCopy         [prev=002 (1)  | sink        ] kCopy
004: kWhile         [prev=000 (1) | next=020 (1)]
condition:
    005: kCustomKernel [source       | next=006 (1)] input_reduce_fusion grid: [1, 1, 1] threads: [32, 1, 1]
    006: kCustomKernel [prev=005 (1) | sink        ] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]
  body:
    000: kCommandBuffer [source | sink]
        007: kCustomKernel [source        | next=008 (1) ] loop_select_fusion grid: [32, 1, 1] threads: [128, 1, 1]
        008: kCustomKernel [prev=007 (1)  | next=009 (1) ] gemm_fusion_dot_722 grid: [640, 1, 1] threads: [64, 1, 1]
    009: kConditional   [prev=000 (1)  | next=000 (1) ]
      branch_0:
        000: kCommandBuffer [source | sink]
            010: kCustomKernel [source | next=011 (1)] dvl_flash_forward grid: [1, 2, 16] threads: [256, 1, 1]
            011: kCustomKernel [prev=010 (1) | sink] loop_add_fusion grid: [2048, 1, 1] threads: [128, 1, 1]
      branch_1:
        000: kCommandBuffer [source | sink]
            012: kCustomKernel [source | next=013 (1)] dvl_flash_forward grid: [1, 2, 16] threads: [256, 1, 1]
            013: kCustomKernel [prev=012 (1) | next=014 (1)] dvl_flash_forward grid: [1, 2, 16] threads: [256, 1, 1]
            014: kCustomKernel [prev=013 (1) | next=015 (1)] loop_add_fusion grid: [2048, 1, 1] threads: [128, 1, 1]
            015: kCustomKernel [prev=014 (1) | sink] loop_add_fusion grid: [2048, 1, 1] threads: [128, 1, 1]
    016: kCustomKernel [prev=009 (1) | sink] loop_add_fusion_72 grid: [1, 1, 1] threads: [1, 1, 1]
020: kCustomKernel  [prev=004 (1) | sink         ] loop_select_fusion_2 grid: [4, 1, 1] threads: [128, 1, 1]
021: kCopy          [prev=004 (3) | sink         ] kCopy
"""


def test_a_steps_kernels_are_its_condition_body_and_one_branch():
  thunks = gpu_programs.parse_thunks(THUNKS)
  assert [t.kind for t in thunks] == ["kCommandBuffer", "kWhile", "kCustomKernel", "kCopy"]
  [loop] = gpu_programs.loops(thunks)
  assert sorted(loop.sections) == ["", "body", "condition"]
  assert gpu_programs.kernels([loop], with_loops=True) == (2 + 2 + 2 + 1, 2 + 2 + 4 + 1)  # condition, body, branch, add
  assert gpu_programs.kernels(thunks) == (5, 5)  # the loop left out: prefill's three, then two
  assert gpu_programs.named([loop], "dvl_") == 2  # the larger branch's
  assert gpu_programs.named(thunks, "dvl_") == 3


def test_a_section_outside_a_loop_or_conditional_is_refused():
  with pytest.raises(ValueError, match="outside a while or conditional"):
    gpu_programs.parse_thunks("000: kCustomKernel [source | sink] loop_add_fusion\nbody:\n")


def test_weight_shaped_elementwise_products_are_counted_and_nothing_else():
  hlo = """\
  %loop_multiply_fusion = bf16[2048,2048]{1,0} fusion(%w.1, %x.1), kind=kLoop, calls=%fused_multiply
  %loop_multiply_fusion.1 = bf16[2048,256]{1,0} fusion(%w.2, %x.1), kind=kLoop, calls=%fused_multiply.1
  %input_reduce_fusion = bf16[2048,2048]{1,0} fusion(%loop_multiply_fusion), kind=kInput, calls=%fused_reduce
  %loop_add_fusion = bf16[2,2048]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add
"""
  assert gpu_programs.weight_shaped_products(hlo, {(2048, 2048), (2048, 256), (2048, 11008)}) == 2
  assert gpu_programs.weight_shaped_products(hlo, {(2048, 11008)}) == 0


def test_copies_of_a_layers_kv_cache_are_counted_and_nothing_else():
  hlo = """\
  %loop_pad_fusion.1 = bf16[2,384,2,128]{3,2,1,0} fusion(%cache.1, %k.1), kind=kLoop, calls=%fused_pad
  %copy.3 = bf16[2,320,2,128]{3,2,1,0} copy(%cache.2)
  %loop_pad_fusion.2 = bf16[2,16,2,128]{3,2,1,0} fusion(%k.2), kind=kLoop, calls=%fused_pad.1
  %fusion.4 = bf16[2,1,20,128]{3,2,1,0} fusion(%qkv), kind=kLoop, calls=%fused_rope
  %dynamic-update-slice.5 = bf16[36,2,320,2,128]{4,3,2,1,0} fusion(%cache.3, %kv), kind=kLoop, calls=%fused_dus
"""
  assert gpu_programs.cache_copies(hlo, 320, 2, 128) == 2  # the appended-and-padded copy and the plain one
  assert gpu_programs.cache_copies(hlo, 320, 4, 128) == 0
