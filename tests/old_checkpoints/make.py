"""Write the checkpoints of tests/test_old_checkpoints.py with an older checkout of this program.

Run from an empty folder: `python make.py /path/to/checkout` (made with commit b66bf5f). Writes vit.ckpt and
dblock.ckpt (optimizer, scheduler and RNG states dropped to keep them small: testing reads neither) and
logits.pt, the logits that checkout's `main.py test --seed 7` computed for every test image.
"""

import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import torch
torch.set_num_threads(1)
import main, module
arch = ["--hidden_size", "12", "--num_hidden_layers", "3", "--num_attention_heads", "2", "--intermediate_size", "12", "--patch_size", "16"]
fast = ["--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu", "--logger", "none", "--progress_every_s", "0"]
logits = []
real = module.LitClassifier.predict_logits
def rec(self, images):
    out = real(self, images); logits.append(out.detach().clone()); return out
module.LitClassifier.predict_logits = rec
out = {}
for mt in ("vit", "dblock"):
    extra = ["--layers_per_block", "2,1", "--cfg_scale", "1.5", "--class_dropout_prob", "0.2"] if mt == "dblock" else []
    assert main.main(["train", "cifar10", "--model_type", mt, "--data_dir", "data", "--run_name", mt, "--max_steps", "3", "--lr", "0.01", *arch, *fast, *extra]) == 0
    ck = torch.load(f"logs/{mt}/last.ckpt", weights_only=True)
    for k in ("optimizer_states", "lr_schedulers", "rng_states", "loops", "callbacks"):
        ck.pop(k, None)
    torch.save(ck, f"{mt}.ckpt")
    logits.clear()
    assert main.main(["test", "cifar10", "--ckpt_path", f"{mt}.ckpt", "--data_dir", "data", "--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu", "--seed", "7", "--save_predictions"]) == 0
    out[mt] = torch.cat(logits)
torch.save(out, "logits.pt")
