"""The pure-PyTorch reference of every op: the specification every backend is tested against, and the
fallback on devices no kernel serves. Importing this package registers the `reference` backend."""

from .. import backends as _backends
from . import cmpa, dafe, insert

_backends.register_impl("cmpa", "reference", cmpa.cmpa_fwd_reference, cmpa.cmpa_bwd_reference)
_backends.register_impl("dafe", "reference", dafe.dafe_fwd_reference, dafe.dafe_bwd_reference)
_backends.register_impl("insert_prompts", "reference", insert.insert_prompts_fwd_reference,
                        insert.insert_prompts_bwd_reference)
_backends.register_impl("insert_prompts_packed", "reference", insert.insert_prompts_packed_fwd_reference,
                        insert.insert_prompts_packed_bwd_reference)
