"""ProjLens (Wang et al., 2026): a backdoor implanted by fine-tuning only the multimodal
projector (``triggers``, ``projector``), its low-rank structure (``lowrank``), the embedding shift
along one shared direction (``shift``); ``scoring`` scores known answers by teacher forcing (the
rank-k grids); ``over_seeds`` the spread of a number and a verdict over fine-tune seeds;
``experiment`` holds what the three notebooks share and ``figures`` their plots."""
