"""Research probes of the toy recipe: what the toy model and OSPO on it do, measured (BUILD.md and BENCHMARKS.md
report their figures). Not the performance suite (``benchmarks/``). Each runs alone, by path or as a module:
``python recipes/toy_janus/probes/toy_ablation.py --help`` or ``python -m recipes.toy_janus.probes.toy_ablation``.

- ``toy_ablation``: the paper's ablations in miniature (several seeds, judged alignment before and after).
- ``toy_guidance_probe``: the pairs' log-probs under the conditional, unconditional and CFG branches.
- ``toy_grounding_probe``: where the image tokens read the caption from, per layer.
- ``toy_mask_probe``: how well the object masks cover the drawn objects, per source and layer.
- ``toy_t2i_breakdown``: why held-out captions fail, per category and cause.
- ``toy_rejudge``: a finished run's kept images judged again by the current judge (which figures a judge change moves).
"""
