"""Deliberately naive reference implementations for the loss tests.

Plain Python floats (double precision), explicit loops over samples, pairs, tokens and classes,
with the math written out. Nothing here imports ssl_vit.
"""
import math


def to_lists(t):
    """Tensor -> nested Python lists of floats."""
    return t.detach().double().tolist()


def log_softmax_row(row, temp):
    z = [v / temp for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def cross_entropy(p, logits, temp):
    """-sum_k p_k log softmax(logits / temp)_k."""
    ls = log_softmax_row(logits, temp)
    return -sum(pk * lk for pk, lk in zip(p, ls))


def dino_loss(student_crops, teacher_crops, student_temp=0.1):
    """student_crops: list over crops of B x K lists (globals first); teacher_crops: 2 crops of probs.

    Returns (loss, number of pairs used, list of (teacher index, student index) pairs)."""
    total, pairs = 0.0, []
    for iq, t in enumerate(teacher_crops):
        for v, s in enumerate(student_crops):
            if v == iq:  # a crop is never compared with itself
                continue
            B = len(s)
            pair_sum = 0.0
            for b in range(B):
                pair_sum += cross_entropy(t[b], s[b], student_temp)
            total += pair_sum / B
            pairs.append((iq, v))
    return total / len(pairs), len(pairs), pairs


def centered_softmax(logits, center, temp):
    """softmax((t - c) / temp) per row: center subtracted first, then temperature."""
    out = []
    for row in logits:
        out.append(softmax_row([(row[k] - center[k]) / temp for k in range(len(row))]))
    return out


def center_ema(center, global_crops, momentum=0.9):
    """center <- m * center + (1 - m) * mean over every sample of every global crop (raw logits)."""
    K = len(center)
    acc = [0.0] * K
    n = 0
    for crop in global_crops:
        for row in crop:
            for k in range(K):
                acc[k] += row[k]
            n += 1
    return [momentum * center[k] + (1 - momentum) * acc[k] / n for k in range(K)]


def sinkhorn(logits, temp, n_iterations=3):
    """logits: B x K lists. Q = exp(l / temp)^T; /global sum; n x (rows /sum /K, cols /sum /B); *B."""
    B, K = len(logits), len(logits[0])
    Q = [[math.exp(logits[b][k] / temp) for b in range(B)] for k in range(K)]  # K x B
    tot = sum(sum(r) for r in Q)
    Q = [[v / tot for v in r] for r in Q]
    for _ in range(n_iterations):
        for k in range(K):
            rs = sum(Q[k])
            Q[k] = [v / rs / K for v in Q[k]]
        for b in range(B):
            cs = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / cs / B
    return [[Q[k][b] * B for k in range(K)] for b in range(B)]


def ibot_masked_loss(student_tokens, teacher_tokens, masks, student_temp=0.1):
    """student_tokens/teacher_tokens: n_images x N x K (all patches); masks: n_images x N bools.

    Per image, mean over its masked patches of the CE (0 if none), summed, / number of images."""
    total = 0.0
    for i in range(len(masks)):
        ces = []
        for j in range(len(masks[i])):
            if masks[i][j]:
                ces.append(cross_entropy(teacher_tokens[i][j], student_tokens[i][j], student_temp))
        total += sum(ces) / len(ces) if ces else 0.0
    return total / len(masks)


def ibot_all_loss(student_tokens, teacher_tokens, student_temp=0.1):
    per_image = []
    for i in range(len(student_tokens)):
        ces = [cross_entropy(teacher_tokens[i][j], student_tokens[i][j], student_temp) for j in range(len(student_tokens[i]))]
        per_image.append(sum(ces) / len(ces))
    return sum(per_image) / len(per_image)


def koleo(x, eps=1e-8):
    """O(n^2) loop: normalise, nearest other row by max dot, -mean log(||xi - xj + eps|| + eps)."""
    xs = []
    for row in x:
        nrm = math.sqrt(sum(v * v for v in row))
        xs.append([v / max(nrm, eps) for v in row])
    n = len(xs)
    logs = []
    for i in range(n):
        best_j, best_dot = None, -math.inf
        for j in range(n):
            if j == i:
                continue
            d = sum(a * b for a, b in zip(xs[i], xs[j]))
            if d > best_dot:
                best_j, best_dot = j, d
        dist = math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(xs[i], xs[best_j])))
        logs.append(math.log(dist + eps))
    return -sum(logs) / n
