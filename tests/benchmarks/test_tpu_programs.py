"""`benchmarks/tpu_programs.py` finds a whole cache's copies and in-place writes in XLA:TPU's optimised HLO, in
the decoding loop or outside it, whatever view of the cache they take. The compile itself needs libtpu, which
the test environment does not install."""

from benchmarks import tpu_programs

# A shortened optimised module: a cache of 2 x 4 x 16 x 1 x 8 = 1,024 elements (one kv head on this chip).
HLO = """\
HloModule jit__sample, entry_computation_layout={(bf16[2,4,16,1,8]{4,3,2,1,0})->bf16[2,4,16,1,8]{4,3,2,1,0}}

%fused_relayout (param_0: bf16[2,4,16,1,8]) -> bf16[2,4,16,8] {
  %param_0 = bf16[2,4,16,1,8]{4,0,2,1,3} parameter(0)
  %copy.7 = bf16[2,4,16,1,8]{4,2,1,0,3} copy(%param_0)
  ROOT %bitcast.1 = bf16[2,4,16,8]{3,2,1,0} bitcast(%copy.7)
}

%fused_update (param_0.1: bf16[2,4,16,1,8], param_1: bf16[2,1,1,1,8]) -> bf16[2,4,16,1,8] {
  %param_0.1 = bf16[2,4,16,1,8]{4,3,2,1,0} parameter(0)
  %param_1 = bf16[2,1,1,1,8]{4,3,2,1,0} parameter(1)
  %convert.1 = bf16[2,1,1,1,8]{4,3,2,1,0} convert(%param_1)
  ROOT %dynamic-update-slice.1 = bf16[2,4,16,1,8]{4,3,2,1,0} dynamic-update-slice(%param_0.1, %convert.1)
}

%region_body (arg: (bf16[2,4,16,1,8])) -> (bf16[2,4,16,1,8]) {
  %arg = (bf16[2,4,16,1,8]) parameter(0)
  %get-tuple-element.1 = bf16[2,4,16,1,8]{4,3,2,1,0} get-tuple-element(%arg), index=0
  %copy_bitcast_fusion = bf16[2,4,16,8]{3,2,1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_relayout
  %dvl_tpu_decode = bf16[4,1,8]{2,1,0} custom-call(%copy_bitcast_fusion), custom_call_target="tpu_custom_call"
  %update_fusion = bf16[2,4,16,1,8]{4,3,2,1,0} fusion(%get-tuple-element.1, %k), kind=kLoop, calls=%fused_update
  %scatter.2 = bf16[128,8]{1,0} scatter(%bitcast.9, %indices, %updates), update_window_dims={1}
  %small = bf16[2,4,1,1,8]{4,3,2,1,0} copy(%new)
  ROOT %tuple.1 = (bf16[2,4,16,1,8]) tuple(%update_fusion)
}

%region_cond (arg.1: (bf16[2,4,16,1,8])) -> pred[] {
  %arg.1 = (bf16[2,4,16,1,8]) parameter(0)
  ROOT %constant.1 = pred[] constant(false)
}

ENTRY %main (param: bf16[2,4,16,1,8]) -> bf16[2,4,16,1,8] {
  %param = bf16[2,4,16,1,8]{4,3,2,1,0} parameter(0)
  %copy.1 = bf16[2,4,16,1,8]{4,0,2,1,3} copy(%param)
  %prefill_fusion = bf16[2,4,16,1,8]{4,0,2,1,3} fusion(%copy.1, %kv), kind=kLoop, calls=%fused_update
  %while.1 = (bf16[2,4,16,1,8]) while(%tuple.0), condition=%region_cond, body=%region_body
  ROOT %get-tuple-element.2 = bf16[2,4,16,1,8]{4,3,2,1,0} get-tuple-element(%while.1), index=0
}
"""


def test_copies_and_in_place_writes_of_the_whole_cache_in_the_loop_and_outside():
  ops = tpu_programs.cache_ops(HLO, 2 * 4 * 16 * 1 * 8)
  # in the loop: the relayout for the kernel's operand (a fusion holding a copy, viewed without the head) is a copy;
  # the fusion rooted in a dynamic-update-slice and the flattened scatter write in place; the window's copy is not
  # the cache's size. Outside: the entry's relayout, and the prefill's update.
  assert ops == {("loop", "copy"): 1, ("loop", "in place"): 2, ("call", "copy"): 1, ("call", "in place"): 1}


def test_nothing_counts_for_another_size():
  assert not tpu_programs.cache_ops(HLO, 2 * 4 * 16 * 1 * 8 * 2)
