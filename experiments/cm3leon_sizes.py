"""The paper's model sizes (CM3Leon, Table: 350M / 760M / 7B); the experiment files pick one."""
from cm3leon_jax.config_defaults import base_config

SEQ_LEN = 4096
GLOBAL_BATCH = 2048          # x 4096 tokens ~ 8.4M tokens per step, as the paper's ~8M; on a slice too small for
                             # it in one pass, --config.gradient_accumulation_steps=N (memory_plan shows the fit)
VOCAB = 65536                # 56,320 BPE + 8192 image codes + specials, rounded for sharding
SIZES = {
    # name: (layers, d_model, heads, peak_lr, training tokens)
    "350m": (24, 1024, 16, 6e-4, 1.4e12),
    "760m": (24, 1536, 16, 5e-4, 1.9e12),
    "7b": (32, 4096, 32, 1.2e-4, 2.4e12),
}


def paper_config(size: str):
    layers, d_model, heads, lr, tokens = SIZES[size]
    config = base_config()
    config.total_steps = int(tokens // (GLOBAL_BATCH * SEQ_LEN))
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.eval_every_steps, config.eval_batches = 1000, 2   # 2 forward passes of a global batch: ~0.1% of the steps' time
    config.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over the whole slice; raise tensor for 7B on big pods
    config.model.update(vocab_size=VOCAB, num_layers=layers, d_model=d_model, num_heads=heads, d_ff=4 * d_model,
                        max_length=SEQ_LEN, dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    config.optimizer.update(peak_lr=lr, warmup_steps=1500, end_lr_ratio=0.1)
    config.data.update(seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, max_doc_length=SEQ_LEN)
    return config
