"""
Chat with a model in the terminal, tokens streaming as they are produced.

    python -m scripts.chat_cli -i sft                       # interactive, multi-turn
    python -m scripts.chat_cli -i sft -p "Why is the sky blue?"   # one prompt, one answer

Commands in interactive mode: 'quit' (or 'exit', Ctrl-D) leaves, 'clear' starts a new conversation.
"""

import argparse

from nanochat.checkpoint import load_model
from nanochat.common import autodetect_device_type, compute_init, usage_errors
from nanochat.decode import for_inference
from nanochat.engine import Engine, StreamDecoder
from nanochat.gpt import check_sampling
from nanochat.stage import STAGE_NAMES

parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
parser.add_argument("-i", "--source", type=str, default="sft", choices=STAGE_NAMES, help="which stage's checkpoint")
parser.add_argument("--model-tag", type=str, default=None, help="model tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k most likely tokens")
parser.add_argument("--max-tokens", type=int, default=1024, help="maximum tokens per reply")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
args = parser.parse_args()
try:
    check_sampling(args.temperature, args.top_k)
except ValueError as e:
    parser.error(str(e))

_, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
with usage_errors():  # no such checkpoint: one line saying which command makes it
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
engine = Engine(for_inference(model), tokenizer)  # CUDA: bf16 weights, decoding as a CUDA graph
context_len = model.config.sequence_len

print(f"nanochat {args.source}/{meta['model_tag']} step {meta['step']} on {device}")
if not args.prompt:
    print("Type 'quit' to exit, 'clear' to start a new conversation.")
messages = []
turn = 0
while True:
    if args.prompt:
        user = args.prompt
    else:
        try:
            user = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if user.lower() in ("quit", "exit"):
            break
        if user.lower() == "clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not user:
            continue
    messages.append({"role": "user", "content": user})
    tokens = tokenizer.render_for_completion({"messages": messages})
    if len(tokens) >= context_len:
        print(f"(the conversation is {len(tokens)} tokens, the model's context holds {context_len}: type 'clear')")
        messages.pop()
        if args.prompt:
            break
        continue

    print("\nAssistant: ", end="", flush=True)
    decoder, reply = StreamDecoder(tokenizer), ""
    # a different seed per turn, reproducible across runs
    for column, _ in engine.generate(tokens, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed + turn):
        if column[0] in engine.stop_tokens:
            break
        piece = decoder.push(column[0])
        reply += piece
        print(piece, end="", flush=True)
    piece = decoder.flush()
    print(piece)
    messages.append({"role": "assistant", "content": reply + piece})
    turn += 1
    if args.prompt:
        break
