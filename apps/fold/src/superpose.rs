//! Optimal rigid superposition of paired points (the Kabsch problem), solved with Horn's unit
//! quaternions: the rotation is the top eigenvector of a symmetric 4×4 matrix built from the
//! cross-covariance, so it is always proper (no reflection fix-up as with an SVD).

pub type Vec3 = [f64; 3];

/// A rigid motion: `x ↦ r·x + t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rigid {
    pub r: [[f64; 3]; 3],
    pub t: Vec3,
}

impl Rigid {
    pub fn apply(&self, x: &Vec3) -> Vec3 {
        let r = &self.r;
        std::array::from_fn(|i| r[i][0] * x[0] + r[i][1] * x[1] + r[i][2] * x[2] + self.t[i])
    }
}

fn centroid(p: &[Vec3]) -> Vec3 {
    let n = p.len().max(1) as f64;
    let mut c = [0.0; 3];
    for x in p {
        for k in 0..3 {
            c[k] += x[k] / n;
        }
    }
    c
}

/// Eigenvalues and eigenvectors (columns) of a symmetric 4×4 matrix, by cyclic Jacobi rotations.
fn jacobi4(mut a: [[f64; 4]; 4]) -> ([f64; 4], [[f64; 4]; 4]) {
    let mut v = [[0.0; 4]; 4];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..4)
            .flat_map(|i| (0..4).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let scale: f64 = (0..4).map(|i| a[i][i] * a[i][i]).sum::<f64>().max(1e-300);
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..4 {
            for q in p + 1..4 {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (rp, rq) = (a[p], a[q]);
                for k in 0..4 {
                    a[p][k] = c * rp[k] - s * rq[k];
                    a[q][k] = s * rp[k] + c * rq[k];
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    (std::array::from_fn(|i| a[i][i]), v)
}

/// The rigid motion that best maps `mobile` onto `target` (least squares over the pairs), and
/// the RMSD it leaves. Fewer than one pair gives the identity.
pub fn superpose(mobile: &[Vec3], target: &[Vec3]) -> (Rigid, f64) {
    assert_eq!(mobile.len(), target.len(), "paired points");
    let n = mobile.len();
    if n == 0 {
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        return (Rigid { r: id, t: [0.0; 3] }, 0.0);
    }
    let (cx, cy) = (centroid(mobile), centroid(target));
    // s[a][b] = Σ x_a y_b over the centred pairs.
    let mut s = [[0.0; 3]; 3];
    for (x, y) in mobile.iter().zip(target) {
        let (x, y): (Vec3, Vec3) = (
            std::array::from_fn(|k| x[k] - cx[k]),
            std::array::from_fn(|k| y[k] - cy[k]),
        );
        for a in 0..3 {
            for b in 0..3 {
                s[a][b] += x[a] * y[b];
            }
        }
    }
    let [[sxx, sxy, sxz], [syx, syy, syz], [szx, szy, szz]] = s;
    let m = [
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ];
    let (vals, vecs) = jacobi4(m);
    let top = (0..4)
        .max_by(|&i, &j| vals[i].total_cmp(&vals[j]))
        .expect("four eigenvalues");
    let q: [f64; 4] = std::array::from_fn(|k| vecs[k][top]);
    let [q0, q1, q2, q3] = q;
    let r = [
        [
            q0 * q0 + q1 * q1 - q2 * q2 - q3 * q3,
            2.0 * (q1 * q2 - q0 * q3),
            2.0 * (q1 * q3 + q0 * q2),
        ],
        [
            2.0 * (q1 * q2 + q0 * q3),
            q0 * q0 - q1 * q1 + q2 * q2 - q3 * q3,
            2.0 * (q2 * q3 - q0 * q1),
        ],
        [
            2.0 * (q1 * q3 - q0 * q2),
            2.0 * (q2 * q3 + q0 * q1),
            q0 * q0 - q1 * q1 - q2 * q2 + q3 * q3,
        ],
    ];
    let rc = Rigid { r, t: [0.0; 3] }.apply(&cx);
    let t = std::array::from_fn(|k| cy[k] - rc[k]);
    let rigid = Rigid { r, t };
    // From the moved points, not from norms − 2λ (which cancels badly near zero).
    let sq: f64 = mobile
        .iter()
        .zip(target)
        .map(|(x, y)| dist2(&rigid.apply(x), y))
        .sum();
    (rigid, (sq / n as f64).sqrt())
}

/// Squared distance.
pub fn dist2(a: &Vec3, b: &Vec3) -> f64 {
    (0..3).map(|k| (a[k] - b[k]) * (a[k] - b[k])).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_rigid_motion() {
        // A rotation about an oblique axis and a shift, applied to a non-planar set.
        let pts: Vec<Vec3> = (0..12)
            .map(|i| {
                let f = i as f64;
                [f.sin() * 3.0, (1.7 * f).cos() * 2.0, f * 0.4 - 2.0]
            })
            .collect();
        let (a, b, c) = (0.3f64, -1.1f64, 2.2f64);
        let rz = [
            [a.cos(), -a.sin(), 0.0],
            [a.sin(), a.cos(), 0.0],
            [0.0, 0.0, 1.0],
        ];
        let ry = [
            [b.cos(), 0.0, b.sin()],
            [0.0, 1.0, 0.0],
            [-b.sin(), 0.0, b.cos()],
        ];
        let rx = [
            [1.0, 0.0, 0.0],
            [0.0, c.cos(), -c.sin()],
            [0.0, c.sin(), c.cos()],
        ];
        let mul = |p: [[f64; 3]; 3], q: [[f64; 3]; 3]| -> [[f64; 3]; 3] {
            std::array::from_fn(|i| {
                std::array::from_fn(|j| (0..3).map(|k| p[i][k] * q[k][j]).sum())
            })
        };
        let motion = Rigid {
            r: mul(rz, mul(ry, rx)),
            t: [5.0, -7.0, 11.0],
        };
        let moved: Vec<Vec3> = pts.iter().map(|p| motion.apply(p)).collect();
        let (found, rmsd) = superpose(&pts, &moved);
        assert!(rmsd < 1e-9, "{rmsd}");
        for i in 0..3 {
            for j in 0..3 {
                assert!((found.r[i][j] - motion.r[i][j]).abs() < 1e-9);
            }
            assert!((found.t[i] - motion.t[i]).abs() < 1e-9);
        }
        // A mirror image is not reachable by a rotation: the RMSD stays well above zero.
        let mirrored: Vec<Vec3> = moved.iter().map(|p| [-p[0], p[1], p[2]]).collect();
        assert!(superpose(&pts, &mirrored).1 > 0.5);
    }
}
