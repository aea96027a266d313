# Sourced by scripts/study.sh and scripts/gate_study.sh: the environment both studies run in, a stage
# banner, and the 8k SentencePiece tokenizer their configs name (trained on the train split once).
export PYTHON=${PYTHON:-python} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
S=train_configs/study
stage() { echo "== $(date +%H:%M:%S) $*"; }

tokenizer=data/tokenizer/corpus8k.model
if [[ ! -f $tokenizer ]]; then
    stage "tokenizer: 8k SentencePiece BPE on the train split"
    "$PYTHON" tools/train_tokenizer.py data/corpus/train --out "${tokenizer%.model}" --vocab-size 8192
fi
