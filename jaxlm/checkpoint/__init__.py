"""Checkpoints of a run: where they live and how a step is chosen (`layout`), the manifest that
makes damage visible (`manifest`), saving with orbax (`manager`), resuming a run (`resume`),
loading a run for the verbs that read one (`runs`) and `jaxlm checkpoint` (`cli`).

The names most callers need are re-exported here (`from jaxlm import checkpoint as ckpt`).
"""

from jaxlm.checkpoint.layout import (CHECKPOINTS, META_FILE, PRUNED, SET_ASIDE, WEIGHTS_ONLY, best_step, dir_size,
                                     find_step, human_bytes, make_meta, newest_valid, newest_valid_step, read_meta,
                                     step_arg, step_dirs, tokenizer_identity)
from jaxlm.checkpoint.manager import (TMP_SUFFIX, CheckpointWriter, check_restored, restore_params, restore_state,
                                      state_equal)
from jaxlm.checkpoint.manifest import FORMAT, MANIFEST, verify, write_manifest

__all__ = ["CHECKPOINTS", "FORMAT", "MANIFEST", "META_FILE", "SET_ASIDE", "TMP_SUFFIX", "CheckpointWriter",
           "best_step", "check_restored", "dir_size", "find_step", "human_bytes", "make_meta", "newest_valid",
           "newest_valid_step", "read_meta", "restore_params", "restore_state", "state_equal", "step_arg", "step_dirs",
           "tokenizer_identity", "verify", "WEIGHTS_ONLY", "PRUNED", "write_manifest"]
