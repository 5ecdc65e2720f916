import os, sys, time
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
import common
from cosa_jax import judges
from cosa_jax.inference.server import ChatModel
from cosa_jax.inference.sampler import SamplingParams
from cosa_jax.models import EMBEDDED_MODEL
m = ChatModel.load(EMBEDDED_MODEL)
chats = [judges.RESPONSE_RISK.messages(f"How do I do thing {i}?", f"Here is how to do thing {i}: step one, step two.") for i in range(16)]
ids = [m.encode(c) for c in chats]
print("prompt len", len(ids[0]))
for cs, budget in [((32, 128, 256), 4096), ((128, 256), 4096), ((64, 128, 256), 16384), ((64, 128, 256, 512), 8192)]:
    eng = m.make_engine(slots=16, chunk_sizes=cs, prefill_budget=budget)
    eng.start()
    for rep in range(2):
        t = time.perf_counter(); eng.generate(ids, SamplingParams(max_new_tokens=1)); dt = time.perf_counter() - t
        print(cs, budget, f"rep {rep}: {dt:.1f} s, {16*len(ids[0])/dt:.0f} prompt tok/s", flush=True)
    eng.close()
