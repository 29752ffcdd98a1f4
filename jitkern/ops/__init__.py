"""Public ops: each validates its tensors, picks a specialization, and launches it."""
from .mamba2 import mamba2_commit_accepted_state, mamba2_mtp_ssm_update  # noqa: F401
from .spec_dec_attention import spec_dec_attention  # noqa: F401
