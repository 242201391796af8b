"""Gemma 3 constants that have a source, in one place.

Sources: the config.json / tokenizer_config.json / generation_config.json of google/gemma-3-27b-it and of
ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g, and transformers' gemma3 code.
"""

REAL_BASE_ID = "ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g"
REAL_CONTEXT_LEN = 32768  # the model card's context length (its config.json says 131072)
REAL_HIDDEN_SIZE = 5376  # identifies the 27B text model

# Special tokens. The tiny base keeps <pad>/<eos>/<bos> and the turn markers at the real ids, so the stop ids
# below hold for both; the image tokens sit at other ids in the tiny vocabulary and are always looked up by text.
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
EOS_ID, END_OF_TURN_ID = 1, 106
STOP_TOKEN_IDS = (END_OF_TURN_ID, EOS_ID)  # generation stops on <end_of_turn> (106) or <eos> (1)

MAX_IMAGES_PER_REQUEST = 8  # serving default (ours and vLLM's --limit-mm-per-prompt); --max-images changes it
RESPONSES_STORE = 256  # serving default: /v1/responses kept for GET and previous_response_id; --responses-store
REAL_TOKENS_PER_IMAGE = 256  # 896x896 SigLIP input pooled to 16x16 soft tokens
SLIDING_WINDOW = 1024

# Quantisation scheme of the real checkpoint: symmetric int4, group size 128, language-model linears only.
QUANT_BITS = 4
QUANT_GROUP_SIZE = 128
