"""The paper's numbers the report compares against, each with where the paper gives it.

Veit, Wilber, Belongie, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks", NeurIPS 2016 (arXiv 1605.06431); experiment ids E1-E10 as in the README. The
strings are the "paper" column of the report's table, written as the paper states them (a
fraction where its axis is a fraction), with the exact value in parentheses where the paper
rounds.
"""

# E1 / Fig. 3 and E8: the full ResNet-110 trained on CIFAR-10 (test error).
RESNET_ERROR = "6.10 %"
# E8: ResNet-110 trained with only 23 of its 54 blocks active in each mini-batch.
EFFECTIVE_ERROR = "5.96 %"
# E3 / Fig. 5a: error after deleting 10 random blocks of ResNet-110 (read off the figure).
DELETE_10 = "≈ 0.2 (≈ 20 %)"
DELETE_K = 10  # of N blocks: another network's row deletes the same share of its blocks
# E5 / Fig. 6a: share of the 2^54 paths whose length lies in 19..35.
PATH_SHARE = "> 95 % (98.0 %)"
# E6 / Fig. 6b: gradient magnitude per path length, sampled 1,000 times per length.
DECAY = "about exponential decay (1,000 paths per length)"
# E7 / Fig. 6c: the lengths that carry nearly all the gradient, and their share of all paths.
EFFECTIVE_LENGTHS = "5–17 (10–34 layers)"
EFFECTIVE_SHARE = "0.45 % (0.4537 %)"
# E1 / Fig. 3: a 15-layer plain (VGG) network with any one layer deleted.
VGG = "chance level (≈ 90 %)"

# ResNet-110's number of residual blocks (3 stages of 18), the n of Fig. 6 and Fig. 7.
N = 54
# E5: the interval the paper quotes for n = 54. The narrowest central interval holding >= 95 %
# is 20..34; the paper's 19..35 holds 98.0 %, so at n = 54 the report shows the paper's own.
E5_INTERVAL = (19, 35)
# E9 / Fig. 7: the numbers of deleted blocks drawn for n = 54.
E9_DELETED = (1, 10, 20)


def delete_k(n: int) -> int:
  """The k of E3's row for a network of ``n`` blocks: the paper's 10 of 54, the same share."""
  return DELETE_K if n == N else max(1, round(DELETE_K * n / N))
