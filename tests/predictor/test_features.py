"""Prompt features, the light package import, and the shipped default predictor."""
import os
import subprocess
import sys
import time

import pytest

from lenserve.predictor.features import FEATURE_NAMES, prompt_body, prompt_features
from lenserve.predictor.model import DEFAULT_DIR
from lenserve.predictor.types import PromptInput


def feats(text):
    return dict(zip(FEATURE_NAMES, prompt_features(text)))


def test_chat_markup_is_stripped():
    text = "Explain photosynthesis in 3 sentences."
    chatml = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    llama3 = f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
    assert prompt_body(chatml) == prompt_body(llama3) == prompt_body(f"[INST] {text} [/INST]") == text
    assert feats(chatml) == feats(text)


def test_requested_lengths_and_cues():
    f = feats("Write a 500-word essay about dogs in three paragraphs, then list five tips.")
    assert f["requested_words_log"] == pytest.approx(6.2166, abs=1e-3)
    assert f["requested_paragraphs_log"] == pytest.approx(1.3863, abs=1e-3)
    assert f["requested_items_log"] == pytest.approx(1.7918, abs=1e-3)
    assert f["cue_essay"] == f["cue_write"] == f["cue_list"] == 1.0
    g = feats("Is Paris the capital of France? Answer yes or no.")
    assert g["yes_no_start"] == 1.0 and g["cue_yes_no"] == 1.0
    assert feats("def f(x):\n    return x\n")["frac_code_lines"] == 1.0


def test_empty_and_unicode_prompts():
    assert len(prompt_features("")) == len(FEATURE_NAMES)
    assert len(prompt_features("¿Qué es la fotosíntesis? 光合作用とは")) == len(FEATURE_NAMES)


def test_package_import_is_light():
    code = "import sys, lenserve.predictor; print(any(m.split('.')[0] in ('lightgbm', 'sklearn', 'torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.skipif(not os.path.exists(os.path.join(DEFAULT_DIR, "manifest.json")), reason="no shipped predictor")
def test_default_predictor_loads_fast_and_predicts():
    from lenserve.predictor import load_default_predictor

    t0 = time.perf_counter()
    predictor = load_default_predictor()
    assert time.perf_counter() - t0 < 2.0  # ~0.4 s on an idle 2-core machine; slack for a busy CI
    short, long = predictor.predict([
        PromptInput("Is the sky blue? Answer yes or no.", 12),
        PromptInput("Write a detailed 1000-word essay on the history of Rome.", 16, max_tokens=4096),
    ])
    assert 1 <= short.mean < long.mean and short.p50 <= short.p90


@pytest.mark.parametrize("analyzer, reference", [
    ("word", {"ngram_range": (1, 2)}),
    ("char_wb", {"analyzer": "char_wb", "ngram_range": (2, 5)}),
])
def test_text_scorer_matches_scikit_learn(analyzer, reference, tmp_path):
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from lenserve.predictor.text import TextScorer
    from lenserve.predictor.train import fit_vectorizer

    texts = ["Write a poem about the sea.", "Explain the sea's tides, briefly!", "List five seas. List them all.",
             "Ünïcode wörds and the  sea\n\tdef f(x):\n    return x**2", "x", "a b", "emoji 🙂🙂 sea 日本語の海"]
    vocab, idf, x = fit_vectorizer(texts, min_df=1, analyzer=analyzer)
    weights = np.random.default_rng(0).standard_normal((len(vocab), 3)).astype(np.float32)
    scorer = TextScorer(vocab, idf, weights, np.array([1.0, 2.0, 3.0], dtype=np.float32), analyzer)
    expected = x.toarray() @ weights + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(scorer.scores(texts), expected, rtol=1e-5, atol=1e-5)
    ref = TfidfVectorizer(sublinear_tf=True, **reference).fit(texts)
    assert sorted(ref.vocabulary_) == sorted(vocab)
    # unseen text: the same terms scikit-learn forms, through a saved and reloaded scorer
    scorer.save(str(tmp_path), prefix="p_")
    loaded = TextScorer.load(str(tmp_path), prefix="p_")
    assert loaded.analyzer == analyzer
    new = ["The sea, the SEA! x**2 and   wörds 🙂", "", "   ", "日本語"]
    ref_x = TfidfVectorizer(sublinear_tf=True, vocabulary=dict(zip(vocab, range(len(vocab)))), **reference).fit(texts)
    ref_x.idf_ = idf
    np.testing.assert_allclose(loaded.scores(new), ref_x.transform(new).toarray() @ weights + np.array([1.0, 2.0, 3.0]),
                               rtol=1e-5, atol=1e-5)
