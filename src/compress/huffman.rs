//! Canonical Huffman coding of small-alphabet symbol streams (Deep Compression, section 4:
//! codebook indices and sparse position gaps are skewed, and Huffman coding them saves
//! 20-30% more).
//!
//! The code is canonical, so a table is just one code length per symbol. Lengths are capped
//! at [`MAX_LEN`] bits by flattening the frequencies and rebuilding, which costs a little
//! compression only on pathological (Fibonacci-like) inputs.

use std::collections::BinaryHeap;

pub const MAX_LEN: u8 = 24;

/// Code lengths for symbols `0..freqs.len()`; symbols with zero frequency get length 0.
pub fn code_lengths(freqs: &[u64]) -> Vec<u8> {
    let mut f: Vec<u64> = freqs.to_vec();
    loop {
        let lens = unlimited_lengths(&f);
        if lens.iter().all(|&l| l <= MAX_LEN) {
            return lens;
        }
        // Halve the counts (keeping non-zero ones non-zero) and rebuild.
        for v in f.iter_mut().filter(|v| **v > 0) {
            *v = (*v / 2).max(1);
        }
    }
}

fn unlimited_lengths(freqs: &[u64]) -> Vec<u8> {
    let used: Vec<usize> = (0..freqs.len()).filter(|&s| freqs[s] > 0).collect();
    let mut lens = vec![0u8; freqs.len()];
    match used.len() {
        0 => return lens,
        1 => {
            lens[used[0]] = 1;
            return lens;
        }
        _ => {}
    }
    // Nodes: leaves 0..n, internal nodes after; parent links give depths.
    let mut parent = vec![usize::MAX; 2 * used.len()];
    let mut heap: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(node, &s)| std::cmp::Reverse((freqs[s], node)))
        .collect();
    let mut next = used.len();
    while heap.len() > 1 {
        let std::cmp::Reverse((fa, a)) = heap.pop().expect("two nodes");
        let std::cmp::Reverse((fb, b)) = heap.pop().expect("two nodes");
        parent[a] = next;
        parent[b] = next;
        heap.push(std::cmp::Reverse((fa + fb, next)));
        next += 1;
    }
    for (node, &s) in used.iter().enumerate() {
        let mut d = 0usize;
        let mut p = node;
        while parent[p] != usize::MAX {
            p = parent[p];
            d += 1;
        }
        lens[s] = d.min(255) as u8;
    }
    lens
}

/// Canonical codes from lengths: `(code, length)` per symbol, codes assigned in order of
/// (length, symbol).
pub fn canonical_codes(lens: &[u8]) -> Vec<(u32, u8)> {
    let mut order: Vec<usize> = (0..lens.len()).filter(|&s| lens[s] > 0).collect();
    order.sort_by_key(|&s| (lens[s], s));
    let mut codes = vec![(0u32, 0u8); lens.len()];
    let mut code = 0u32;
    let mut prev_len = 0u8;
    for (i, &s) in order.iter().enumerate() {
        if i > 0 {
            code += 1;
        }
        code <<= lens[s] - prev_len;
        prev_len = lens[s];
        codes[s] = (code, lens[s]);
    }
    codes
}

/// Encodes `symbols` (each `< lens.len()` with a non-zero length) MSB-first into bytes.
/// Returns the bytes and the number of bits used.
pub fn encode(symbols: &[u32], lens: &[u8]) -> Result<(Vec<u8>, u64), String> {
    let codes = canonical_codes(lens);
    let mut out = Vec::new();
    let (mut acc, mut nacc, mut bits) = (0u64, 0u32, 0u64);
    for &s in symbols {
        let &(code, len) = codes
            .get(s as usize)
            .filter(|(_, l)| *l > 0)
            .ok_or_else(|| format!("symbol {s} has no code"))?;
        acc = (acc << len) | code as u64;
        nacc += len as u32;
        bits += len as u64;
        while nacc >= 8 {
            out.push((acc >> (nacc - 8)) as u8);
            nacc -= 8;
        }
        acc &= (1u64 << nacc) - 1;
    }
    if nacc > 0 {
        out.push((acc << (8 - nacc)) as u8);
    }
    Ok((out, bits))
}

/// Decodes `count` symbols from `bytes` with the canonical code of `lens`. Refuses damaged
/// input (a bit pattern no code starts, or too few bits) instead of guessing.
pub fn decode(bytes: &[u8], bits: u64, count: usize, lens: &[u8]) -> Result<Vec<u32>, String> {
    if bits > 8 * bytes.len() as u64 {
        return Err(format!(
            "{bits} bits claimed, {} available",
            8 * bytes.len()
        ));
    }
    if lens.iter().any(|&l| l > MAX_LEN) {
        return Err(format!("code length over {MAX_LEN}"));
    }
    // Canonical decoding tables: for each length, the first code and the index of its first
    // symbol in (length, symbol) order.
    let mut order: Vec<usize> = (0..lens.len()).filter(|&s| lens[s] > 0).collect();
    order.sort_by_key(|&s| (lens[s], s));
    let max = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut count_per_len = vec![0u32; max + 1];
    for &s in &order {
        count_per_len[lens[s] as usize] += 1;
    }
    // Kraft check: an over-full table cannot be a prefix code.
    let kraft: f64 = order.iter().map(|&s| 0.5f64.powi(lens[s] as i32)).sum();
    if kraft > 1.0 + 1e-12 {
        return Err("code lengths do not form a prefix code".into());
    }
    let mut first_code = vec![0u32; max + 2];
    let mut first_index = vec![0usize; max + 2];
    let (mut code, mut index) = (0u32, 0usize);
    for len in 1..=max {
        first_code[len] = code;
        first_index[len] = index;
        code = (code + count_per_len[len]) << 1;
        index += count_per_len[len] as usize;
    }
    let mut out = Vec::with_capacity(count.min(bits as usize));
    let mut pos = 0u64;
    for _ in 0..count {
        let (mut c, mut len) = (0u32, 0usize);
        loop {
            if pos >= bits {
                return Err("bit stream ends inside a code".into());
            }
            let bit = (bytes[(pos / 8) as usize] >> (7 - pos % 8)) & 1;
            pos += 1;
            c = (c << 1) | bit as u32;
            len += 1;
            if len > max {
                return Err("bit pattern matches no code".into());
            }
            let n = count_per_len[len];
            if n > 0 && c >= first_code[len] && c - first_code[len] < n {
                out.push(order[first_index[len] + (c - first_code[len]) as usize] as u32);
                break;
            }
        }
    }
    Ok(out)
}
