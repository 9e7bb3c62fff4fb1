"""Repeat 50-step token trainings of the tiny Flux under a mutation mode; count runs that raise."""
import sys
sys.path.insert(0, "/work/main/tests")
import importlib.util
spec = importlib.util.spec_from_file_location("dynamic_dit_host", "/work/main/devtools/host.py")
host = importlib.util.module_from_spec(spec); sys.modules[spec.name] = host; spec.loader.exec_module(host)
host.prepare(cpu=True); host.load_pack()
import torch
torch.set_num_threads(1)
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.training import trainer
from comfyui_dynamic_dit.training.trainer import TrainConfig, train
from support.training import LATENT, SAMPLING, student_for
mode, runs = sys.argv[1], int(sys.argv[2])
if mode == "torch":
    trainer.mutation_context = lambda m: torch.autograd.graph.allow_mutation_on_saved_tensors()
    mode = "allow"
config = tiny_flux.TinyFlux()
model = reference_model.build_model(config)
jobs = [tiny_flux.conditioning(config, seed=s) for s in range(2)]
bank = training_host.record_trajectories(model, jobs, LATENT, seeds=[0], **SAMPLING)
failures = 0
for run in range(runs):
    student = student_for(model, bank, seed=run, parts=("tokens", "td_lora"), ratio_regions=2)
    try:
        train(student, bank, TrainConfig(target=0.6, steps=50, batch=4, checkpoint_every=1000, seed=run, mutation=mode), progress_bar=False)
    except RuntimeError as error:
        failures += 1
        print(f"run {run}: {error}".splitlines()[0], flush=True)
print(f"{sys.argv[1]}: {failures} of {runs} runs failed", flush=True)
