# Session 29, call C (fresh machine): is the Ray worker's slower compiled step its thread? plain, plain in a thread, ray.
for b in .gpu/*.tar.xz; do python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall('/tmp/site')" $b; done
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
T=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
python3 -m compileall -q -j 16 $T/torch $T/triton $T/transformers $T/peft $T/accelerate $T/safetensors $T/tokenizers $T/huggingface_hub /tmp/site > /dev/null 2>&1
python3 bench/gpu/train_speed.py --out $OUT --configs plain-fast-compiled,plain-fast-compiled-thread,ray-fast-compiled --repeats 2 --warmup 3 --timed 20 --deadline 470
