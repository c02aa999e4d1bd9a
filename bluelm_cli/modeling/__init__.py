"""BlueLM for current transformers. Importing this package registers BlueLM with the Auto classes.

After `import bluelm_cli.modeling`, `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer` load a
published BlueLM folder natively, without executing the Python files shipped inside it.

May import: core (the chat format, for the tokenizer). Nothing above it.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from bluelm_cli.modeling.configuration import BlueLMConfig
from bluelm_cli.modeling.modeling_bluelm import BlueLMForCausalLM, BlueLMModel, rope_inverse_frequencies
from bluelm_cli.modeling.tokenizer import BlueLMTokenizer

AutoConfig.register(BlueLMConfig.model_type, BlueLMConfig, exist_ok=True)
AutoModel.register(BlueLMConfig, BlueLMModel, exist_ok=True)
AutoModelForCausalLM.register(BlueLMConfig, BlueLMForCausalLM, exist_ok=True)
AutoTokenizer.register(BlueLMConfig, tokenizer_class=BlueLMTokenizer, exist_ok=True)

__all__ = ["BlueLMConfig", "BlueLMForCausalLM", "BlueLMModel", "BlueLMTokenizer", "rope_inverse_frequencies"]
