"""ospo_fast.engine: KV-cached generation over transformers' Janus.

- ``image_gen.generate_images``: batched classifier-free-guided image generation with a static cache, per-row
  seeds, one fixed-shape decode step (compiled: CUDA graphs on CUDA, inductor on CPU), and in-flight
  object-attention capture inside that step;
- ``text_gen.generate_text``: batched, seeded text generation with per-row stop tokens;
- ``vqa.score_yes_no``: self-VQA yes/no probabilities with the image prefix computed once per image;
- ``sampling``: the shared temperature / top-k / top-p / counter-based seeded sampler;
- ``object_attention``: capture of image-token -> object-word attention without materialising attention;
- ``prompts``: the one image-generation prompt layout and position-id rule (also used by training).
Submodules import transformers; import them where used.
"""
