"""Rehearse, on a CPU-only machine, inductor's CUDA code generation for the image engine's compiled decode step
(``ospo_fast.engine.image_gen._decode_step``) at Janus-Pro widths, with the engine's attention (the decode attention
over filled slots, an extern custom op in the graph) and optionally the in-flight object capture.

The language model is cut to ``--layers`` layers (every layer lowers to the same kernels); every Triton kernel
inductor generates is compiled for sm_90 (or FAKE_CUDA_CC) by ptxas; nothing runs on a GPU. The decode attention's
own kernels are compiled by ``ospo_fast.kernels.aot``. Prints "all compiled" and exits 0, or exits 1 with the error.

    OMP_NUM_THREADS=1 python tests/rehearsal/rehearse_decode.py --batch 16 --layers 2 --capture [--7b] [--window 16]
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakecuda  # noqa: E402  (patches torch: before anything imports it)

fakecuda.install()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
import torch  # noqa: E402
from transformers import JanusForConditionalGeneration  # noqa: E402

from ospo_fast.engine import image_gen  # noqa: E402
from ospo_fast.engine.attention import engine_attention_on  # noqa: E402
from ospo_fast.models import factory  # noqa: E402


def build_decoder(args) -> tuple[torch.nn.Module, image_gen._Decoder]:
    """A bf16 Janus at 1B or 7B widths with ``args.layers`` layers, and a decoder mid-batch (prompt prefilled)."""
    kind = "janus-pro-7b-shape" if args.seven else "janus-pro-1b-shape"
    sizes = dataclasses.replace(factory.sizes_for(kind, 24), layers=args.layers, vision_layers=1, vq_res_blocks=1,
                                vq_base_channels=32, vq_latent_channels=32)
    config = factory.janus_config(sizes, {"bos": 0, "eos": 1, "pad": 2, "image": 3})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = JanusForConditionalGeneration(config).to(torch.bfloat16).eval()
    torch.set_default_dtype(torch.float32)
    model.config.text_config._attn_implementation = "sdpa"
    sampling = image_gen._Sampling(5.0, 1.0, args.top_k, args.top_p)
    objects = (4, 4) if args.capture else (0, 0)
    shape = image_gen._Shape(args.batch, args.prompt_len, 576, sampling, *objects,
                             tuple(range(args.layers)) if args.capture else (), window=args.window)
    decoder = image_gen._Decoder(model, shape, torch.device("cpu"))
    text = config.text_config
    decoder.cache.early_initialization(2 * args.batch, text.num_key_value_heads,
                                       text.hidden_size // text.num_attention_heads, torch.bfloat16,
                                       torch.device("cpu"))
    if decoder.capture is not None:
        decoder.capture.load(torch.randint(0, args.prompt_len, (args.batch, *objects)))
    decoder.mask[:, :args.prompt_len] = 1
    decoder.first_position.fill_(args.prompt_len)
    decoder.slots.end.fill_(args.prompt_len)
    return model, decoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per batch (2x rows under CFG)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt bucket (a multiple of 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--7b", dest="seven", action="store_true", help="7B widths (hidden 4096, 32 heads)")
    p.add_argument("--capture", action="store_true", help="with the in-flight object-attention capture")
    p.add_argument("--window", type=int, default=0, help="Jacobi decoding's window W (0: sequential steps)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    args = p.parse_args()
    t0 = time.time()
    model, decoder = build_decoder(args)
    print(f"model built in {time.time() - t0:.0f} s ({args.layers} layers)", flush=True)
    recording = decoder.capture.recording(model) if decoder.capture is not None else contextlib.nullcontext()
    with engine_attention_on(model), recording:
        t0 = time.time()
        graphs = fakecuda.capture(image_gen._decode_step, decoder)
        print(f"dynamo + AOT on CPU: {len(graphs)} graph(s) in {time.time() - t0:.0f} s", flush=True)
        ops = {str(n.target) for gm, _ in graphs for n in gm.graph.nodes if n.op == "call_function"}
        print("decode attention in the graph:", any("decode_attention" in op for op in ops))
        for gm, inputs in graphs:
            t0 = time.time()
            try:
                kernels = fakecuda.compile_for_cuda(gm, inputs)
            except Exception as error:  # noqa: BLE001  (the point is to print any refusal, then exit 1)
                text = str(error)
                at = text.find("CompilationError")
                print(f"FAILED after {time.time() - t0:.0f} s: {type(error).__name__}: "
                      f"{text[at:at + 2500] if at >= 0 else text[-2500:]}")
                return 1
            names = sorted({k[0] for k in kernels})
            print(f"inductor -> {len(names)} Triton kernels ({len(kernels)} config compiles) for "
                  f"sm_{fakecuda.CC} in {time.time() - t0:.0f} s: all compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
