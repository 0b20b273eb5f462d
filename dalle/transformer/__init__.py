"""Stage 2: the decoder-only transformer over one stream of text and image tokens (paper sec. 2.2).

model.py the architecture; attention.py the sparse masks; decoding.py the key/value-cached steps;
sampling.py `sample()`; layouts.py the stream orders (text to image, caption, question and answer);
reading.py writing and scoring text given an image; fit.py the check that a transformer, a dVAE and a
tokenizer belong together.
"""
