package vaulttest

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// apiError is an error with the HTTP status Vault answers it with. Its
// message goes into {"errors":[...]} verbatim, like the text of a Vault
// logical.ErrorResponse; an empty message renders as {"errors":[]}.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

// badRequest is logical.ErrorResponse(...) with logical.ErrInvalidRequest: 400.
func badRequest(format string, args ...any) error {
	return &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

// coded is logical.CodedError: a chosen status and message.
func coded(status int, format string, args ...any) error {
	return &apiError{status: status, msg: fmt.Sprintf(format, args...)}
}

var (
	// errUnsupportedPath is logical.ErrUnsupportedPath, a path no backend
	// handles.
	errUnsupportedPath = &apiError{status: http.StatusNotFound, msg: "unsupported path"}
	// errUnsupportedOperation is logical.ErrUnsupportedOperation.
	errUnsupportedOperation = &apiError{status: http.StatusMethodNotAllowed, msg: "unsupported operation"}
	// errPermissionDenied is logical.ErrPermissionDenied as returned for a
	// request without a token, or by a backend.
	errPermissionDenied = &apiError{status: http.StatusForbidden, msg: "permission denied"}
	// errInvalidToken is what Vault 1.16+ answers for a token that does not
	// exist or has expired: ErrPermissionDenied and ErrInvalidToken in a
	// multierror.
	errInvalidToken = &apiError{status: http.StatusForbidden,
		msg: multiErrorText("permission denied", "invalid token")}
	// errACLDenied is a policy refusal: CheckToken appends
	// ErrPermissionDenied to a multierror.
	errACLDenied = &apiError{status: http.StatusForbidden, msg: multiErrorText("permission denied")}
)

// multiErrorText renders messages the way hashicorp/go-multierror's default
// ListFormatFunc does, which is how Vault reports wrapped errors.
func multiErrorText(msgs ...string) string {
	if len(msgs) == 1 {
		return fmt.Sprintf("1 error occurred:\n\t* %s\n\n", msgs[0])
	}
	points := make([]string, len(msgs))
	for i, m := range msgs {
		points[i] = "* " + m
	}
	return fmt.Sprintf("%d errors occurred:\n\t%s\n\n", len(msgs), strings.Join(points, "\n\t"))
}

// errorStatus maps a handler error to Vault's status and message. Errors
// that are not apiErrors are backend failures: Vault wraps them in a
// multierror and answers 500.
func errorStatus(err error) (int, string) {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae.status, ae.msg
	}
	return http.StatusInternalServerError, multiErrorText(err.Error())
}
