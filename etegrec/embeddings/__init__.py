"""Step 2: item embeddings aligned to the prepared item map (row j of every file = item id j+1).

``sasrec.run(cfg)`` trains RecBole's SASRec (collaborative vectors, ``<NAME>_emb_<dim>.npy``) and
``text.run(cfg)`` encodes item text with sentence-transformers (``<NAME>_sentence-transformer_text_<dim>.npy``).
RecBole is imported only through ``recbole_compat``, which makes recbole 1.2.1 work with NumPy 2 and torch >= 2.6.
"""
